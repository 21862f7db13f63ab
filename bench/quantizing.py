"""What the benchmarks quantize with: the stage's engine plugins, given the params a manifest's
`quantize` step writes, on a Keras model or a float .tflite (shared by bench_recipes and
bench_techniques)."""

from __future__ import annotations

import tempfile
from pathlib import Path


def quantized(
    keras_model, float_bytes: bytes | None, engine_name: str, params: dict, calibration, training=None, hints=None
) -> bytes:
    """The .tflite engine `engine_name` makes of the model (`keras_model`, else the float
    `float_bytes`) with the `quantize` params `params`; raises InputError where it cannot."""
    from pipeline_stage import ConversionSettings, QuantizationJob, QuantizationRequest
    from pipeline_stage.contract.report import SourceRef
    from pipeline_stage.host.plugin_host import build_host
    from pipeline_stage_plugins.quantize.params import QuantizeParams
    from pipeline_stage_plugins.source_tensorflow import KerasSource

    settings = QuantizeParams(engine=engine_name, **params)
    calibrated = settings.mode in ("int8", "int16x8", "qat")
    request = QuantizationRequest(
        engine_name,
        settings,
        settings.mode,
        "calibration" if calibrated else None,
        settings.calibration_samples,
        "training" if settings.mode == "qat" else None,
    )
    io_type = {"float": "float32", "int8": "int8", "int16": "int16"}[settings.io]
    conversion = ConversionSettings(
        quantization=request, inference_input_type=io_type, inference_output_type=io_type, hints=dict(hints or {})
    )
    source = KerasSource(SourceRef(uri="bench"), Path("."), keras_model) if keras_model is not None else None
    work = Path(tempfile.mkdtemp(prefix="bench-quantize-"))

    def convert_float() -> bytes:
        return (
            float_bytes
            if float_bytes is not None
            else source.to_float_tflite(conversion.float_part(), keras_model, work / "f.log")
        )

    job = QuantizationJob(
        request=request,
        conversion=conversion,
        source=source,
        model=keras_model,
        load_data=lambda name: training if name == "training" else calibration,
        workdir=work,
        log_path=work / "convert.log",
        log=lambda line: None,
        convert_float=convert_float,
    )
    return build_host(load_entry_points=False).engines[engine_name].cls().quantize(job)
