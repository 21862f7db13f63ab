"""Built-in step `analyze` (the optimization toolkit's analysis): op histogram, tensor size
breakdown, and per-layer quantization error as the engine that quantized measures it
(TensorFlow's QuantizationDebugger for the converter, the LiteRT Quantizer's comparison of the
float and the quantized model for litert, whatever a third-party engine offers). It changes
nothing; it feeds the report (and the accuracy-aware search)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from pydantic import Field

from pipeline_stage import Params, Phase, Step, hookimpl, read_flatbuffer

DTYPE_BYTES = {"FLOAT32": 4, "FLOAT16": 2, "INT8": 1, "UINT8": 1, "INT16": 2, "INT32": 4, "INT64": 8, "BOOL": 1}


class AnalyzeParams(Params):
    per_layer: bool = Field(
        True,
        description=(
            "Per-layer quantization error, as the engine measures it: full-int8 conversions of Keras models (the "
            "converter's quantization debugger), every LiteRT Quantizer model (its float-vs-quantized comparison, per op "
            "the error it adds)."
        ),
    )
    samples: int = Field(50, ge=1, le=10000, description="Evaluation samples the per-layer comparison runs.")
    top: int = Field(10, ge=1, le=1000, description="How many of the worst layers the report lists.")


class Analyze(Step):
    """Op histogram, tensor sizes, per-layer quantization error; the model is left unchanged."""

    name = "analyze"
    phase = Phase.TFLITE
    Params = AnalyzeParams

    def apply(self, model_bytes, ctx):
        info = read_flatbuffer(model_bytes)
        weights = [(t.name, t.dtype, int(np.prod(t.shape)) * DTYPE_BYTES.get(t.dtype, 4)) for t in info.tensors if t.is_constant]
        by_dtype: dict[str, int] = {}
        for _, dtype, size in weights:
            by_dtype[dtype] = by_dtype.get(dtype, 0) + size
        ctx.notes.update(
            {
                "op_histogram": dict(info.ops.most_common()),
                "weight_bytes_by_dtype": by_dtype,
                # where the bytes go besides the weights: per-channel quantization parameters and names
                "quantization_param_bytes": info.quantization_param_bytes(),
                "tensor_name_bytes": info.tensor_name_bytes(),
                "largest_weights": [
                    {"tensor": n[:80], "dtype": d, "bytes": b} for n, d, b in sorted(weights, key=lambda w: -w[2])[:5]
                ],
                "model_bytes": len(model_bytes),
            }
        )
        if self.params.per_layer:
            ctx.notes["per_layer"] = self._per_layer(model_bytes, ctx)
        return model_bytes

    def _per_layer(self, model_bytes, ctx):
        if ctx.per_layer_errors is None:
            return "only after a quantization (the engine that quantized measures it)"
        rows = ctx.per_layer_errors(model_bytes, self.params.samples)
        if isinstance(rows, str):
            return rows
        if rows:
            path = Path(ctx.workdir) / "layer_stats.csv"
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]), extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
            ctx.artifacts["layer_stats.csv"] = path
        return rows[: self.params.top]


@hookimpl
def register_steps(register):
    register(Analyze)
