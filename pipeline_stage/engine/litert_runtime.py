"""Run a .tflite model with the LiteRT interpreter: batching, int8/int16 I/O, latency.

Self-contained on purpose (numpy and ai_edge_litert only): it is shipped inside every registered
pyfunc model, so a consumer can run the model without installing pipeline-stage.
"""

from __future__ import annotations

import time

import numpy as np

# Registerers of custom ops' kernels, as "module:function" (a pybind function that takes the op
# resolver's address) or the name of a C function loaded in the process: every interpreter made
# here uses them. The stage sets them from its plugins (the `register_op_resolvers` hook), the
# registered model's pyfunc from its model config.
_OP_REGISTERERS: list[str] = []


def use_op_registerers(registerers: list[str]) -> None:
    """Make every interpreter of this process load these custom op registerers (see above);
    each "module:function" is imported now, so a missing one fails here, by name."""
    for registerer in registerers:
        _resolve(registerer)
    _OP_REGISTERERS[:] = list(registerers)


def op_registerers_in_use() -> list[str]:
    """The custom op registerers every interpreter of this process loads (see use_op_registerers)."""
    return list(_OP_REGISTERERS)


def _resolve(registerer: str):
    if ":" not in registerer:
        return registerer  # a C symbol the interpreter looks up by name
    import importlib

    module, _, function = registerer.partition(":")
    return getattr(importlib.import_module(module), function)


def make_interpreter(
    model_bytes: bytes,
    threads: int = 1,
    xnnpack: bool = True,
    preserve_all_tensors: bool = False,
    op_registerers: list[str] | None = None,
):
    """A LiteRT interpreter for `model_bytes` with the custom op registerers in use (or
    `op_registerers`): XNNPACK, LiteRT's default CPU delegate, unless `xnnpack` is False (plain
    kernels: every intermediate tensor is computed, which `preserve_all_tensors` reads back)."""
    import warnings

    from ai_edge_litert.interpreter import Interpreter, InterpreterWithCustomOps, OpResolverType

    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    registerers = [_resolve(r) for r in (_OP_REGISTERERS if op_registerers is None else op_registerers)]
    kwargs = dict(
        model_content=bytes(model_bytes),
        num_threads=threads,
        experimental_op_resolver_type=resolver,
        experimental_preserve_all_tensors=preserve_all_tensors,
    )
    with warnings.catch_warnings():  # "for debugging purposes only": reading every tensor is what it is for
        warnings.simplefilter("ignore", UserWarning)
        if registerers:
            return InterpreterWithCustomOps(custom_op_registerers=registerers, **kwargs)
        return Interpreter(**kwargs)


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


def _named_details(interpreter, signature: str | None = None) -> tuple[dict[str, dict], dict[str, dict]]:
    """Input and output tensor details by signature name (`signature`, default the first), in
    signature order; by tensor name for a model without signatures."""
    signatures = interpreter.get_signature_list()
    if signatures:
        key = signature if signature in signatures else next(iter(signatures))
        runner = interpreter.get_signature_runner(key)
        ins, outs = runner.get_input_details(), runner.get_output_details()
        order = signatures[key]
        return {n: ins[n] for n in order["inputs"]}, {n: outs[n] for n in _by_position(order["outputs"])}
    return ({d["name"]: d for d in interpreter.get_input_details()}, {d["name"]: d for d in interpreter.get_output_details()})


def _by_position(names: list[str]) -> list[str]:
    """`output_0, output_1, ...` (how a converter names the outputs of a list-output model) in
    numeric order; other names as they come."""
    if all(n.startswith("output_") and n[7:].isdigit() for n in names):
        return sorted(names, key=lambda n: int(n[7:]))
    return list(names)


class TFLiteModel:
    """A .tflite model behind the LiteRT interpreter, quantizing inputs and dequantizing outputs.

    Inputs and outputs have the names of the model's signature (`signature`, default the first;
    a model without one: its tensors' names); ``predict`` runs the first input to the first output,
    ``predict_outputs`` takes every input by name and returns every output.
    """

    def __init__(
        self,
        model_bytes: bytes,
        threads: int = 1,
        xnnpack: bool = True,
        op_registerers: list[str] | None = None,
        signature: str | None = None,
    ):
        self.model_bytes = model_bytes
        self.signature = signature
        self.interpreter = make_interpreter(model_bytes, threads, xnnpack, op_registerers=op_registerers)
        self._inputs, self._outputs = _named_details(self.interpreter, signature)
        self.input_names, self.output_names = list(self._inputs), list(self._outputs)
        self.input = next(iter(self._inputs.values()))
        self.output = next(iter(self._outputs.values()))
        self.dynamic_batch = all(int(d["shape_signature"][0]) == -1 for d in self._inputs.values())
        # a model whose inputs fix the batch (vendors' files: 1) is fed exactly that many samples a call
        self.fixed_batch = None if self.dynamic_batch else int(self.input["shape_signature"][0] or 1)
        self._batch = None

    @property
    def input_shape(self) -> tuple:
        return tuple(int(d) for d in self.input["shape_signature"][1:])

    @property
    def input_shapes(self) -> dict[str, tuple]:
        return {n: tuple(int(d) for d in det["shape_signature"][1:]) for n, det in self._inputs.items()}

    def _ensure_batch(self, n: int, shapes: dict[str, tuple] | None = None) -> None:
        """Resize the inputs to a batch of `n` (and, for dynamic dimensions, to the data's `shapes`);
        a fixed-shape model keeps its shapes."""
        if self.fixed_batch is not None and not any(-1 in d["shape_signature"] for d in self._inputs.values()):
            if self._batch is None:
                self.interpreter.allocate_tensors()
                self._batch = "fixed"
            return
        wanted = {
            name: [n, *(shapes[name][1:] if shapes and -1 in d["shape_signature"][1:] else d["shape"][1:])]
            for name, d in self._inputs.items()
        }
        if self._batch != wanted:
            for name, detail in self._inputs.items():
                self.interpreter.resize_tensor_input(detail["index"], wanted[name])
            self.interpreter.allocate_tensors()
            self._inputs, self._outputs = _named_details(self.interpreter, self.signature)
            self.input = next(iter(self._inputs.values()))
            self.output = next(iter(self._outputs.values()))
            self._batch = wanted

    def _run(self, inputs: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
        self._ensure_batch(self.fixed_batch or stop - start, {k: v.shape for k, v in inputs.items()})
        short = (self.fixed_batch or 0) - (stop - start)
        for name, detail in self._inputs.items():
            rows = inputs[name][start:stop]
            if short > 0:  # the last samples of a fixed-batch model: padded with the last one, dropped after
                rows = np.concatenate([rows, np.repeat(rows[-1:], short, axis=0)])
            self.interpreter.set_tensor(detail["index"], _quantize(rows, detail))
        self.interpreter.invoke()
        out = {name: _dequantize(self.interpreter.get_tensor(d["index"]), d) for name, d in self._outputs.items()}
        return {name: value[: stop - start] for name, value in out.items()} if short > 0 else out

    def predict_outputs(self, inputs, batch_size: int = 64) -> dict[str, np.ndarray]:
        """Every output by name, for inputs by name (an array stands for the only input); a model
        whose inputs fix the batch gets that many samples a call (see :meth:`feeding`)."""
        if not isinstance(inputs, dict):
            inputs = {self.input_names[0]: inputs}
        n = len(next(iter(inputs.values())))
        batch = batch_size if self.dynamic_batch else self.fixed_batch
        chunks = [self._run(inputs, start, min(start + batch, n)) for start in range(0, n, batch)]
        return {name: np.concatenate([c[name] for c in chunks], axis=0) for name in self.output_names}

    def feeding(self) -> str | None:
        """How this model is fed when its inputs fix the batch, in words (None: any batch)."""
        if self.fixed_batch is None:
            return None
        if self.fixed_batch == 1:
            return "one sample per call (the model's inputs have a fixed batch of 1)"
        return f"{self.fixed_batch} samples per call (the model's fixed batch), the last call padded with its last sample"

    def predict(self, x, batch_size: int = 64) -> np.ndarray:
        """The first output for the first input (a single-input, single-output model's prediction)."""
        return self.predict_outputs(x, batch_size)[self.output_names[0]]

    def latencies_ms(self, sample, runs: int, warmup: int = 10) -> np.ndarray:
        """Per-invocation wall time in ms for a batch of one (the interpreter is reused); `sample` is
        an array for the only input, or arrays by input name."""
        if not isinstance(sample, dict):
            sample = {self.input_names[0]: sample}
        batch = self.fixed_batch or 1
        self._ensure_batch(batch, {k: v.shape for k, v in sample.items()})
        for name, detail in self._inputs.items():
            self.interpreter.set_tensor(detail["index"], _quantize(np.repeat(sample[name][:1], batch, axis=0), detail))
        for _ in range(warmup):
            self.interpreter.invoke()
        times = np.empty(runs)
        for i in range(runs):
            start = time.perf_counter()
            self.interpreter.invoke()
            times[i] = (time.perf_counter() - start) * 1000.0
        return times
