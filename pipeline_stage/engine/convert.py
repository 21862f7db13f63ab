"""The one TFLite conversion: ConversionSettings (filled in by `convert` steps) -> flatbuffer."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline_stage.contract.errors import InputError
from pipeline_stage.contract.steps import ConversionSettings
from pipeline_stage.engine.tf_env import captured_output, import_tf

if TYPE_CHECKING:
    from pipeline_stage.contract.data import Dataset
    from pipeline_stage.engine.source_model import SourceModel


def _converter(tf, model: Any, saved_model_dir=None, signature: str = "serving_default"):
    if saved_model_dir is not None:
        return tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir), signature_keys=[signature])
    return tf.lite.TFLiteConverter.from_keras_model(model)


def sparse_storage(settings: ConversionSettings) -> bool:
    """Whether pruned weights are stored in the sparse (block) format: float models only. A sparse
    int8 FULLY_CONNECTED fails to prepare in LiteRT 2.3's XNNPACK at batch > 1 (checked), while
    the dense int8 zeros still compress well (the `gzip_size_bytes` metric)."""
    return settings.sparsity and settings.quantization in (None, "float16")


def build_converter(
    source: "SourceModel | None",
    settings: ConversionSettings,
    *,
    keras_model: Any = None,
    representative: "Dataset | None" = None,
):
    """A TFLiteConverter set up as `settings` ask (analysis steps reuse it, e.g. the quantization debugger)."""
    tf = import_tf()
    model = keras_model if keras_model is not None else source.keras_model
    converter = _converter(
        tf, model, None if model is not None else source.saved_model_dir, source.signature if source else "serving_default"
    )

    mode = settings.quantization
    if mode is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if sparse_storage(settings):
        converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY, *converter.optimizations]
    if mode in ("int8", "int16x8"):
        if representative is None:
            raise InputError(f"quantization `{mode}` needs representative data", hint="add `data: {calibration: <URI>}`")
        converter.representative_dataset = _calibration(source, model, representative, settings.calibration_samples)
        ops = (
            tf.lite.OpsSet.TFLITE_BUILTINS_INT8
            if mode == "int8"
            else tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        )
        converter.target_spec.supported_ops = [ops]
    elif mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if not settings.per_channel:
        # The converter's only switch for per-tensor weight scales (a private attribute, checked
        # on TF 2.21; tests assert one scale per weight tensor in the flatbuffer).
        converter._experimental_disable_per_channel = True
    if settings.allow_select_tf_ops:
        converter.target_spec.supported_ops = list(converter.target_spec.supported_ops) + [tf.lite.OpsSet.SELECT_TF_OPS]
    if settings.allow_custom_ops:
        converter.allow_custom_ops = True
    dtypes = {"float32": tf.float32, "int8": tf.int8, "int16": tf.int16}
    if settings.inference_input_type != "float32":
        converter.inference_input_type = dtypes[settings.inference_input_type]
    if settings.inference_output_type != "float32":
        converter.inference_output_type = dtypes[settings.inference_output_type]
    return converter


def _input_names(source: "SourceModel | None", model: Any) -> list[str]:
    from pipeline_stage.engine.source_model import keras_input_names

    return keras_input_names(model) if model is not None else source.input_names


def _calibration(source: "SourceModel | None", model: Any, data: "Dataset", limit: int):
    """The converter's representative dataset: one sample at a time, a list for a single-input
    model (as TF's examples), a dict by input name for several inputs."""
    names = _input_names(source, model)
    arrays = {k: v[:limit].astype(np.float32) for k, v in data.inputs(names).items()}
    n = len(next(iter(arrays.values())))

    def samples():
        for i in range(n):
            yield [arrays[names[0]][i : i + 1]] if len(names) == 1 else {k: v[i : i + 1] for k, v in arrays.items()}

    return samples


def _selective(converter, settings: ConversionSettings) -> bytes:
    """Full int8 except the denylisted op types / nodes, which stay float (TF's documented route:
    the quantization debugger's denylists, then its non-debug model). `keep_float_outputs` adds the
    nodes that feed only those outputs, found in the calibrated float graph."""
    from pipeline_stage.engine.flatbuffer import branch_nodes

    tf = import_tf()

    def options(nodes: list[str]):
        return tf.lite.experimental.QuantizationDebugOptions(
            denylisted_ops=settings.keep_float_ops or None,
            denylisted_nodes=nodes or None,
            fully_quantize=settings.inference_input_type != "float32",
        )

    nodes = list(settings.keep_float_nodes)
    # The converter's representative dataset calibrates; the debug dataset only feeds debug runs.
    debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_options=options(nodes))
    if settings.keep_float_outputs:
        nodes += [n for n in branch_nodes(debugger.calibrated_model, settings.keep_float_outputs) if n not in nodes]
        debugger.options = options(nodes)
    return bytes(debugger.get_nondebug_quantized_model())


def _qat(
    source: "SourceModel",
    settings: ConversionSettings,
    keras_model: Any,
    representative: "Dataset | None",
    training: "Dataset | None",
    log_path: Path,
    log,
) -> bytes:
    """Quantization-aware fine-tuning with tfmot in the tf_keras child, converted to int8 there."""
    from pipeline_stage.engine.tfmot_bridge import run_task

    model = keras_model if keras_model is not None else source.keras_model
    if model is None:
        raise InputError(
            "quantize mode qat fine-tunes a Keras model, but the source is a SavedModel",
            hint="log the model with mlflow.tensorflow.log_model, or use mode int8",
        )
    if training is None or representative is None:
        raise InputError("quantize mode qat needs `training` and calibration data", hint="add them under `data:`")
    folder = log_path.parent / "qat"
    folder.mkdir(parents=True, exist_ok=True)
    # by reference (Dataset.files): the child reads the training set a batch at a time
    training_files = training.files(folder / "training")
    calibration_files = representative.take(settings.calibration_samples).files(folder / "calibration")
    # The child converts the quantization-aware model with build_converter, as full int8 with these settings.
    int8 = dataclasses.replace(settings, quantization="int8", engine="converter", fine_tune={}, training_data=None)
    conversion = {k: v for k, v in dataclasses.asdict(int8).items() if k != "set_by"}
    run_task(
        {
            "task": "qat",
            "training": training_files,
            "calibration": calibration_files,
            "params": settings.fine_tune,
            "conversion": conversion,
            "seed": settings.fine_tune.get("seed", 0),
        },
        model,
        folder,
        log=log,
    )
    log_path.write_text((folder / "worker.log").read_text(errors="replace"))  # the conversion's log, as for the others
    return (folder / "model.tflite").read_bytes()


def float_settings(settings: ConversionSettings) -> ConversionSettings:
    """The float conversion `settings` build on: the converter's options without the quantization
    (what the LiteRT Quantizer quantizes afterwards)."""
    return ConversionSettings(
        allow_select_tf_ops=settings.allow_select_tf_ops, allow_custom_ops=settings.allow_custom_ops, sparsity=settings.sparsity
    )


def _litert(float_bytes: bytes, settings: ConversionSettings, representative: "Dataset | None", log_path) -> bytes:
    """Quantize a float .tflite with the LiteRT Quantizer; its own progress bars and reports go to the log."""
    from pipeline_stage.engine.litert_quantize import quantize

    try:
        with captured_output(log_path) if log_path is not None else contextlib.nullcontext():
            return quantize(float_bytes, settings, representative)
    except InputError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise InputError(
            f"the LiteRT Quantizer failed ({settings.quantization}, int{settings.weight_bits} weights, "
            f"{settings.algorithm}): {type(exc).__name__}: {first}",
            hint="try another recipe (docs/manifest.md lists the combinations), or engine converter for a TensorFlow source",
        ) from None


def convert(
    source: "SourceModel",
    settings: ConversionSettings,
    *,
    keras_model: Any = None,
    representative: "Dataset | None" = None,
    training: "Dataset | None" = None,
    log_path: Path | None = None,
    log=lambda msg: None,
    float_model: bytes | None = None,
) -> bytes:
    """Convert the (possibly transformed) model once, as `settings` ask.

    :param keras_model: the model after the `model` phase (defaults to the source's Keras model).
    :param representative: calibration data when the settings need it.
    :param training: fine-tuning data (mode qat).
    :param log_path: where the converter's own output goes (a temporary file when None).
    :param log: progress lines of long work (qat epochs).
    :param float_model: engine litert: the float .tflite to quantize (converted here when None).
    """
    if settings.quantization is None and source.tflite_bytes is not None and keras_model is None:
        return source.tflite_bytes  # a float .tflite source is its own conversion
    if settings.quantization == "qat":
        path = log_path if log_path is not None else Path(tempfile.mkdtemp(prefix="qat-")) / "convert.log"
        return _qat(source, settings, keras_model, representative, training, path, log)
    if settings.engine == "litert":
        if float_model is None:
            float_model = convert(source, float_settings(settings), keras_model=keras_model, log_path=log_path)
        return _litert(float_model, settings, representative, log_path)
    if source.tflite_bytes is not None and keras_model is None:
        raise InputError(
            "the source is a .tflite file: the converter engine needs the TensorFlow model it was converted from",
            hint="quantize it with the LiteRT Quantizer (`engine: auto` or `litert`), or give the Keras / SavedModel model",
        )
    converter = build_converter(source, settings, keras_model=keras_model, representative=representative)
    own_log = log_path is None
    if own_log:
        fd, name = tempfile.mkstemp(prefix="convert-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    try:
        with captured_output(log_path):
            if settings.keep_float_ops or settings.keep_float_nodes or settings.keep_float_outputs:
                return _selective(converter, settings)
            return bytes(converter.convert())
    except InputError:
        raise
    except Exception as exc:  # ConverterError and friends: turn into one message naming the ops
        text = str(exc) + "\n" + log_path.read_text(errors="replace")
        ops = sorted(set(re.findall(r"'(tf\.[A-Za-z0-9_]+)'", text)))
        if ops:
            raise InputError(
                f"TFLite cannot convert these ops with builtins: {', '.join(ops)}",
                hint="set `conversion: {allow_select_tf_ops: true}` in the manifest (the app then needs the Flex delegate), or replace the ops",
            ) from None
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise InputError(f"TFLite conversion failed: {first}", hint=f"the converter's log: {log_path}") from None
    finally:
        if own_log and log_path.exists() and sys.exc_info()[0] is None:
            log_path.unlink()
