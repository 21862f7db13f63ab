"""Quantization engine `converter`: the TFLite converter quantizes while it converts the
TensorFlow model (post-training dynamic, int8, float16, int16x8; selective int8 through the
quantization debugger's denylists; quantization-aware training through tfmot, :mod:`.qat`).

It needs the TensorFlow model, so it takes the TensorFlow sources only: their ``tf_converter``
gives the float converter it adds its settings to. Its per-layer error is TensorFlow's
QuantizationDebugger on a full-int8 conversion of a Keras model.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from pipeline_stage import InputError, QuantizationEngine, captured_output, import_tensorflow, run_converter
from pipeline_stage_plugins.quantize.converter_settings import configure_quantization, selective


class ConverterEngine(QuantizationEngine):
    """The TFLite converter: quantization during conversion (needs the TensorFlow model)."""

    name = "converter"
    modes = ("dynamic", "int8", "float16", "int16x8", "qat")
    source_kinds = ("keras", "saved_model")

    def quantize(self, job) -> bytes:
        p = job.request.settings
        if p.mode == "qat":
            from pipeline_stage_plugins.quantize.qat import quantize_aware

            return quantize_aware(job)
        converter = job.source.tf_converter(job.conversion, job.model)
        calibration = job.calibration()
        if p.mode in ("int8", "int16x8") and calibration is None:
            raise InputError(f"quantization `{p.mode}` needs representative data", hint="add `data: {calibration: <URI>}`")
        configure_quantization(converter, p.mode, p.per_channel, job.conversion.hints, calibration, job.source.input_names)
        if p.keep_float_ops or p.keep_float_nodes or p.keep_float_outputs:
            return run_converter(converter, job.log_path, convert=lambda: selective(converter, p, job.conversion))
        return run_converter(converter, job.log_path)

    def per_layer_errors(self, job, quantized: bytes, data, samples: int) -> list[dict] | str:
        p = job.request.settings
        if job.model is None or p.mode != "int8":
            return "only for full-int8 conversions of Keras models"
        if len(job.source.input_names) > 1:
            return "only for single-input models (the quantization debugger's dataset takes one input here)"
        tf = import_tensorflow()
        x = np.asarray(data.x[:samples], dtype=np.float32)
        converter = job.source.tf_converter(job.conversion, job.model)
        configure_quantization(converter, p.mode, p.per_channel, job.conversion.hints, job.calibration(), job.source.input_names)
        out = io.StringIO()
        with captured_output(Path(job.workdir) / "analyze.log"):
            debugger = tf.lite.experimental.QuantizationDebugger(
                converter=converter, debug_dataset=lambda: ([x[i : i + 1]] for i in range(len(x)))
            )
            debugger.run()
            debugger.layer_statistics_dump(out)
        rows = []
        for row in csv.DictReader(io.StringIO(out.getvalue())):
            scale = float(row["scale"]) or 1.0
            rows.append(
                {
                    "op": row["op_name"],
                    "tensor": row["tensor_name"],
                    # error in units of the quantization step: > ~0.3 is where int8 starts to hurt
                    "rmse/scale": round(float(np.sqrt(float(row["mean_squared_error"])) / scale), 4),
                    "max_abs_error": float(row["max_abs_error"]),
                    "scale": float(row["scale"]),
                }
            )
        rows.sort(key=lambda r: -r["rmse/scale"])
        return rows
