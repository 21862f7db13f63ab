"""Built-in step `analyze` (the optimization toolkit's analysis): op histogram, tensor size
breakdown, and per-layer quantization error, on either engine: TensorFlow's QuantizationDebugger
for the converter, the LiteRT Quantizer's comparison of the float and the quantized model for
litert. It changes nothing; it feeds the report (and the accuracy-aware search)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from pydantic import Field

from pipeline_stage import (
    Params,
    Phase,
    Step,
    build_converter,
    captured_output,
    hookimpl,
    import_tensorflow,
    litert_per_tensor_errors,
    read_flatbuffer,
)

DTYPE_BYTES = {"FLOAT32": 4, "FLOAT16": 2, "INT8": 1, "UINT8": 1, "INT16": 2, "INT32": 4, "INT64": 8, "BOOL": 1}


class AnalyzeParams(Params):
    per_layer: bool = Field(
        True,
        description=(
            "Per-layer quantization error: full-int8 conversions of Keras models (the converter's quantization "
            "debugger), and every LiteRT Quantizer model (its float-vs-quantized comparison, per op the error it adds)."
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
        settings = ctx.conversion
        if settings is not None and settings.engine == "litert" and settings.quantization is not None:
            return self._litert(model_bytes, ctx)
        if ctx.model is None or settings is None or settings.quantization != "int8":
            return "only for full-int8 conversions of Keras models"
        if len(ctx.model.inputs) > 1:
            return "only for single-input models (the quantization debugger's dataset takes one input here)"
        tf = import_tensorflow()
        representative = ctx.load_data(settings.representative_data)
        x = ctx.load_data("evaluation").x[: self.params.samples].astype(np.float32)
        converter = build_converter(None, settings, keras_model=ctx.model, representative=representative)
        out = io.StringIO()
        with captured_output(Path(ctx.workdir) / "analyze.log"):
            debugger = tf.lite.experimental.QuantizationDebugger(
                converter=converter, debug_dataset=lambda: ([x[i : i + 1]] for i in range(len(x)))
            )
            debugger.run()
            debugger.layer_statistics_dump(out)
        rows = list(csv.DictReader(io.StringIO(out.getvalue())))
        for row in rows:
            scale = float(row["scale"]) or 1.0
            # error in units of the quantization step: > ~0.3 is where int8 starts to hurt
            row["rmse/scale"] = float(np.sqrt(float(row["mean_squared_error"])) / scale)
        rows.sort(key=lambda r: -r["rmse/scale"])
        path = Path(ctx.workdir) / "layer_stats.csv"
        path.write_text(out.getvalue())
        ctx.artifacts["layer_stats.csv"] = path
        return [
            {
                "op": r["op_name"],
                "tensor": r["tensor_name"],
                "rmse/scale": round(r["rmse/scale"], 4),
                "max_abs_error": float(r["max_abs_error"]),
                "scale": float(r["scale"]),
            }
            for r in rows[: self.params.top]
        ]

    def _litert(self, model_bytes, ctx):
        if ctx.float_model is None:
            return "the float model the LiteRT Quantizer quantized is not at hand"
        rows = litert_per_tensor_errors(ctx.float_model, model_bytes, ctx.load_data("evaluation"), self.params.samples)
        path = Path(ctx.workdir) / "layer_stats.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["op", "tensor", "rmse/scale", "relative_error"])
            writer.writeheader()
            writer.writerows(rows)
        ctx.artifacts["layer_stats.csv"] = path
        return rows[: self.params.top]


@hookimpl
def register_steps(register):
    register(Analyze)
