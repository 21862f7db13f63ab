"""Run a .tflite model with the LiteRT interpreter: batching, int8/int16 I/O, latency.

Self-contained on purpose (numpy and ai_edge_litert only): it is shipped inside every registered
pyfunc model, so a consumer can run the model without installing pipeline-stage.
"""

from __future__ import annotations

import time

import numpy as np


def _interpreter(model_bytes: bytes, threads: int, xnnpack: bool = True):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    # AUTO applies XNNPACK, LiteRT's default CPU delegate; the other resolver runs plain kernels.
    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    return Interpreter(model_content=model_bytes, num_threads=threads, experimental_op_resolver_type=resolver)


def _quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    dtype = detail["dtype"]
    if np.issubdtype(dtype, np.floating):
        return x.astype(dtype, copy=False)
    scale, zero_point = detail["quantization"]
    if scale == 0:
        return x.astype(dtype)
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(dtype)


def _dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
    if np.issubdtype(y.dtype, np.floating):
        return y
    scale, zero_point = detail["quantization"]
    if scale == 0:
        return y.astype(np.float32)
    return (y.astype(np.float32) - zero_point) * scale


class TFLiteModel:
    """A .tflite model behind the LiteRT interpreter, quantizing inputs and dequantizing outputs."""

    def __init__(self, model_bytes: bytes, threads: int = 1, xnnpack: bool = True):
        self.model_bytes = model_bytes
        self.interpreter = _interpreter(model_bytes, threads, xnnpack)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.dynamic_batch = int(self.input["shape_signature"][0]) == -1
        self._batch = None

    @property
    def input_shape(self) -> tuple:
        return tuple(int(d) for d in self.input["shape_signature"][1:])

    def _ensure_batch(self, n: int) -> None:
        if self._batch != n:
            self.interpreter.resize_tensor_input(self.input["index"], [n, *self.input["shape"][1:]])
            self.interpreter.allocate_tensors()
            self.input = self.interpreter.get_input_details()[0]
            self.output = self.interpreter.get_output_details()[0]
            self._batch = n

    def predict(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        batch = batch_size if self.dynamic_batch else 1
        outputs = []
        for start in range(0, len(x), batch):
            chunk = x[start : start + batch]
            self._ensure_batch(len(chunk))
            self.interpreter.set_tensor(self.input["index"], _quantize(chunk, self.input))
            self.interpreter.invoke()
            outputs.append(_dequantize(self.interpreter.get_tensor(self.output["index"]), self.output))
        return np.concatenate(outputs, axis=0)

    def latencies_ms(self, sample: np.ndarray, runs: int, warmup: int = 10) -> np.ndarray:
        """Per-invocation wall time in ms for a batch of one (the interpreter is reused)."""
        self._ensure_batch(1)
        self.interpreter.set_tensor(self.input["index"], _quantize(sample[:1], self.input))
        for _ in range(warmup):
            self.interpreter.invoke()
        times = np.empty(runs)
        for i in range(runs):
            start = time.perf_counter()
            self.interpreter.invoke()
            times[i] = (time.perf_counter() - start) * 1000.0
        return times
