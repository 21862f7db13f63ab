"""The TFLite converter set up to quantize: a mode's options, the representative dataset, and
selective int8 through the quantization debugger's denylists (what the converter engine and the
quantization-aware training's own conversion share)."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline_stage import branch_nodes, import_tensorflow

SPARSE_WEIGHTS = "sparse_weights"  # the hint `prune` gives; the converter stores sparse float / float16 weights only


def configure_quantization(converter, mode: str, per_channel: bool, hints: dict, calibration, input_names: list[str]) -> None:
    """Set `converter` (a float TFLiteConverter) up for `mode`, calibrated on `calibration`."""
    tf = import_tensorflow()
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if hints.get(SPARSE_WEIGHTS) and mode == "float16":
        # A sparse int8 FULLY_CONNECTED fails to prepare in LiteRT 2.3's XNNPACK at batch > 1 (checked),
        # while the dense int8 zeros still compress well (the `gzip_size_bytes` metric).
        converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY, tf.lite.Optimize.DEFAULT]
    if mode in ("int8", "int16x8"):
        converter.representative_dataset = representative_dataset(calibration, input_names)
        ops = (
            tf.lite.OpsSet.TFLITE_BUILTINS_INT8
            if mode == "int8"
            else tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        )
        selected = [o for o in converter.target_spec.supported_ops if o == tf.lite.OpsSet.SELECT_TF_OPS]
        converter.target_spec.supported_ops = [ops, *selected]
    elif mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if not per_channel:
        # The converter's only switch for per-tensor weight scales (a private attribute, checked
        # on TF 2.21; tests assert one scale per weight tensor in the flatbuffer).
        converter._experimental_disable_per_channel = True


def representative_dataset(data, names: list[str]):
    """The converter's representative dataset: one sample at a time, a list for a single-input
    model (as TF's examples), a dict by input name for several inputs."""
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in data.inputs(names).items()}
    n = len(next(iter(arrays.values())))

    def samples():
        for i in range(n):
            yield [arrays[names[0]][i : i + 1]] if len(names) == 1 else {k: v[i : i + 1] for k, v in arrays.items()}

    return samples


def selective(converter, p: Any, conversion) -> bytes:
    """Full int8 except the denylisted op types / nodes, which stay float (TF's documented route:
    the quantization debugger's denylists, then its non-debug model). `keep_float_outputs` adds the
    nodes that feed only those outputs, found in the calibrated float graph."""
    tf = import_tensorflow()
    ops = [op.upper() for op in p.keep_float_ops]

    def options(nodes: list[str]):
        return tf.lite.experimental.QuantizationDebugOptions(
            denylisted_ops=ops or None,
            denylisted_nodes=nodes or None,
            fully_quantize=conversion.inference_input_type != "float32",
        )

    nodes = list(p.keep_float_nodes)
    # The converter's representative dataset calibrates; the debug dataset only feeds debug runs.
    debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_options=options(nodes))
    if p.keep_float_outputs:
        nodes += [n for n in branch_nodes(debugger.calibrated_model, p.keep_float_outputs) if n not in nodes]
        debugger.options = options(nodes)
    return bytes(debugger.get_nondebug_quantized_model())
