"""The TFLite converter for a TensorFlow model (Keras or SavedModel), set up for a float conversion
with what every conversion takes (I/O types, op sets, the sparse-weights hint), and run with its
console output kept: what the TensorFlow source plugin converts with and the converter engine
quantizes with."""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from pipeline_stage.contract.errors import InputError
from pipeline_stage.contract.steps import ConversionSettings
from pipeline_stage.engine.tf_env import captured_output, import_tf

SPARSE_WEIGHTS = "sparse_weights"  # the hint `prune` gives: store the zeros sparsely where the format allows


def build_converter(
    settings: ConversionSettings,
    *,
    keras_model: Any = None,
    saved_model_dir: Path | str | None = None,
    signature: str = "serving_default",
):
    """A TFLiteConverter for `keras_model` (or the SavedModel at `saved_model_dir`, its `signature`)
    set up for a float conversion as `settings` ask; an engine adds its quantization to it."""
    tf = import_tf()
    if saved_model_dir is not None:
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir), signature_keys=[signature])
    else:
        converter = tf.lite.TFLiteConverter.from_keras_model(keras_model)
    if settings.hints.get(SPARSE_WEIGHTS):
        converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
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


def run_converter(converter, log_path: Path | None = None, convert: Callable[[], Any] | None = None) -> bytes:
    """Run `convert` (default: ``converter.convert``) with the converter's console output in
    `log_path` (a temporary file, removed on success, when None); a conversion error becomes one
    :class:`InputError` naming the ops TFLite lacks, or the converter's first line and its log."""
    own_log = log_path is None
    if own_log:
        fd, name = tempfile.mkstemp(prefix="convert-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    try:
        with captured_output(log_path):
            return bytes((convert or converter.convert)())
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
