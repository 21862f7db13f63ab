"""The second quantization engine: the LiteRT Quantizer (litert-quantizer) on a float .tflite.

Google documents quantization during conversion as deprecated in favour of this route: convert
to float32, then quantize the flatbuffer with a recipe. Same params as the converter engine:
``dynamic`` -> dynamic_wi8_afp32, ``int8`` -> static_wi8_ai8, ``int16x8`` -> static_wi8_ai16;
``keep_float_ops`` / ``keep_float_nodes`` (and the branches of ``keep_float_outputs``) become
``no_quantize`` rules, and so do the graph's inputs and outputs unless ``io`` asks for integer ones.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np

from pipeline_stage.contract.errors import InputError
from pipeline_stage.contract.steps import ConversionSettings

if TYPE_CHECKING:
    from pipeline_stage.contract.data import Dataset

RECIPES = {"dynamic": "dynamic_wi8_afp32", "int8": "static_wi8_ai8", "int16x8": "static_wi8_ai16"}


def _recipe(mode: str, per_channel: bool):
    """The named recipe of RECIPES, built with RecipeManager so the weight granularity can be chosen
    (the named recipe functions are these same calls with per-channel weights)."""
    from litert_quantizer import qtyping, recipe_manager
    from litert_quantizer.qtyping import TFLOperationName

    granularity = qtyping.QuantGranularity.CHANNELWISE if per_channel else qtyping.QuantGranularity.TENSORWISE
    manager = recipe_manager.RecipeManager()
    if mode == "dynamic":
        manager.add_dynamic_config(regex=".*", operation_name=TFLOperationName.ALL_SUPPORTED, num_bits=8, granularity=granularity)
    else:
        manager.add_static_config(
            regex=".*",
            operation_name=TFLOperationName.ALL_SUPPORTED,
            activation_num_bits=16 if mode == "int16x8" else 8,
            weight_num_bits=8,
            weight_granularity=granularity,
        )
    return manager.get_quantization_recipe()


def quantize(float_bytes: bytes, settings: ConversionSettings, representative: "Dataset | None") -> bytes:
    """Quantize a float .tflite as `settings` ask; returns the quantized flatbuffer."""
    from ai_edge_litert.interpreter import Interpreter
    from litert_quantizer import Quantizer
    from litert_quantizer.qtyping import TFLOperationName

    mode = settings.quantization
    if mode not in RECIPES:
        raise InputError(f"engine litert does not offer mode `{mode}`", hint=f"use one of {sorted(RECIPES)} or engine converter")
    qt = Quantizer(bytearray(float_bytes))
    qt.load_quantization_recipe(_recipe(mode, settings.per_channel))
    known = {op.value for op in TFLOperationName}
    for op in settings.keep_float_ops:
        if op not in known:
            raise InputError(
                f"keep_float_ops: `{op}` is not an op the LiteRT Quantizer knows",
                hint=f"use TFLite op names such as {', '.join(sorted(known - {'*'})[:8])}",
            )
        qt.update_quantization_recipe(regex=".*", operation_name=TFLOperationName(op), algorithm_key="no_quantize")
    # The recipes quantize the graph's inputs and outputs too (int8 I/O); `io: float`, the default,
    # keeps them float as the converter engine does: QUANTIZE/DEQUANTIZE at the edges.
    for op, io_type in (
        (TFLOperationName.INPUT, settings.inference_input_type),
        (TFLOperationName.OUTPUT, settings.inference_output_type),
    ):
        if io_type == "float32":
            qt.update_quantization_recipe(regex=".*", operation_name=op, algorithm_key="no_quantize")
    nodes = list(settings.keep_float_nodes)
    if settings.keep_float_outputs:
        from pipeline_stage.engine.flatbuffer import branch_nodes

        nodes += [n for n in branch_nodes(float_bytes, settings.keep_float_outputs) if n not in nodes]
    for node in nodes:
        qt.update_quantization_recipe(
            regex=re.escape(node), operation_name=TFLOperationName.ALL_SUPPORTED, algorithm_key="no_quantize"
        )
    calibration = None
    if qt.need_calibration:
        if representative is None:
            raise InputError(f"quantization `{mode}` needs representative data", hint="add `data: {calibration: <URI>}`")
        signatures = Interpreter(model_content=bytes(float_bytes)).get_signature_list()
        key = next(iter(signatures))
        arrays = {
            k: v[: settings.calibration_samples].astype(np.float32)
            for k, v in representative.inputs(signatures[key]["inputs"]).items()
        }
        rows = len(next(iter(arrays.values())))
        samples = [{k: v[i : i + 1] for k, v in arrays.items()} for i in range(rows)]
        calibration = qt.calibrate({key: samples}, num_threads=1)
    result = qt.quantize(calibration, enable_progress_report=False)
    return bytes(result.quantized_model)
