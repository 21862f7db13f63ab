"""Quantization engine `litert`: the LiteRT Quantizer (litert-quantizer) on the float ``.tflite``.

Google documents quantization during conversion as deprecated in favour of this route: convert
to float32, then quantize the flatbuffer with a recipe. The mode picks the recipe family
(``dynamic`` -> dynamic_wi8_afp32, ``int8`` -> static_wi8_ai8, ``int16x8`` -> static_wi8_ai16,
``weight_only`` -> weight_only_wi8_afp32, ``float16`` -> float casting), and ``weight_bits``,
``per_channel`` / ``block_size`` and ``algorithm`` fill it in; a ``recipe`` file is applied as it
is. ``keep_float_ops`` / ``keep_float_nodes`` (and the branches of ``keep_float_outputs``) become
``no_quantize`` rules, and so do the graph's inputs and outputs unless ``io`` asks for integer
ones. It takes any source (the source plugin converts to float first); its per-layer error is the
LiteRT Quantizer's own comparison of the float and the quantized model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_stage import (
    InputError,
    QuantizationEngine,
    branch_nodes,
    captured_output,
    first_line,
    make_interpreter,
    read_flatbuffer,
)

# The stage's algorithm names -> the LiteRT Quantizer's. `hadamard` is its decomposed rotation:
# the custom-op variant's models corrupt the LiteRT 2.3 interpreter's heap here (the process aborts).
ALGORITHM_KEYS = {
    "min_max": "MIN_MAX_UNIFORM_QUANT",
    "mse": "MSE",
    "octav": "OCTAV",
    "gptq": "GPTQ",
    "hadamard": "DECOMPOSED_HADAMARD_ROTATION",
}


class LiteRTEngine(QuantizationEngine):
    """The LiteRT Quantizer: recipes applied to the float .tflite (any source)."""

    name = "litert"
    modes = ("dynamic", "int8", "float16", "int16x8", "weight_only")
    integer_modes = ("dynamic", "int8", "int16x8", "weight_only")  # its integer recipes
    calibrated_algorithms = ("gptq",)  # it fits the weights to the layer's inputs: it needs calibration data

    @staticmethod
    def check_params(p: Any) -> None:
        """The recipe knobs' combinations the LiteRT Quantizer takes (raise ValueError naming them)."""
        if p.weight_bits == 4 and p.mode not in ("dynamic", "weight_only", "int8"):
            raise ValueError(f"weight_bits 4 applies to modes dynamic, weight_only and int8, not `{p.mode}`")
        if p.block_size and (p.mode != "dynamic" or p.weight_bits != 4):
            raise ValueError(
                "block_size applies to mode dynamic with weight_bits 4 (the LiteRT Quantizer leaves other modes' "
                "weights unquantized at a block granularity)"
            )
        if p.block_size and p.algorithm == "mse":
            raise ValueError("block_size does not combine with algorithm mse; use min_max, octav, gptq or hadamard")
        if p.algorithm != "min_max" and p.mode not in LiteRTEngine.integer_modes:
            raise ValueError(
                f"algorithm `{p.algorithm}` applies to modes {', '.join(LiteRTEngine.integer_modes)}, not `{p.mode}`"
            )
        if not p.per_channel and p.block_size:
            raise ValueError("per_channel: false and block_size each choose the weight granularity: set one of them")

    @staticmethod
    def check_recipe_params(p: Any) -> None:
        """A recipe file decides the recipe: the params that would are left unset, and it must parse."""
        if p.engine == "converter":
            raise ValueError("a recipe file is the LiteRT Quantizer's: use `engine: litert` (or leave `engine` at auto)")
        clash = sorted(p.model_fields_set & {"mode", "weight_bits", "block_size", "algorithm", "per_channel"})
        if clash:
            raise ValueError(f"the recipe file decides the recipe: leave {', '.join(clash)} unset beside `recipe`")
        path = Path(p.recipe)
        if not path.is_file():
            raise ValueError(f"recipe file `{p.recipe}` does not exist (a path relative to the working directory)")
        try:
            content = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"recipe file `{p.recipe}` is not JSON: {exc}") from None
        if not isinstance(content, list) or not all(isinstance(r, dict) and "regex" in r and "operation" in r for r in content):
            raise ValueError(
                f"recipe file `{p.recipe}` is not a LiteRT Quantizer recipe: a JSON list of "
                "{regex, operation, algorithm_key, op_config} entries (see litert_quantizer/recipes/)"
            )

    def quantize(self, job) -> bytes:
        p = job.request.settings
        float_bytes = job.float_model()
        try:
            with captured_output(job.log_path):
                out = quantize(float_bytes, p, job.conversion, job.calibration(), job.notes)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(
                f"the LiteRT Quantizer failed ({job.request.mode}, int{p.weight_bits} weights, "
                f"{p.algorithm}): {type(exc).__name__}: {first_line(exc)}",
                hint="try another recipe (docs/manifest.md lists the combinations), or engine converter for a TensorFlow source",
            ) from None
        if job.request.mode in ("int8", "int16x8"):
            kept = kept_float(out)
            if kept:
                job.notes["kept_float_by_engine"] = {
                    "ops": kept,
                    "why": "the LiteRT Quantizer has no integer recipe for these ops: they run in float between "
                    "DEQUANTIZE and QUANTIZE",
                }
        return out

    def per_layer_errors(self, job, quantized: bytes, data, samples: int) -> list[dict] | str:
        try:
            return per_tensor_errors(job.float_model(), quantized, data, samples)
        except InputError:
            raise
        except Exception as exc:  # the comparison runs the models in the quantizer's own interpreter
            return f"the LiteRT Quantizer could not compare the float and the quantized model: {first_line(exc)}"


def _granularity(p: Any):
    from litert_quantizer import qtyping

    if p.block_size:
        return qtyping.QuantGranularity(f"BLOCKWISE_{p.block_size}")
    return qtyping.QuantGranularity.CHANNELWISE if p.per_channel else qtyping.QuantGranularity.TENSORWISE


def recipe_for(p: Any) -> list[dict[str, Any]]:
    """The LiteRT Quantizer recipe the quantize params `p` ask for, built with its RecipeManager
    (the named recipe functions are these same calls with per-channel weights and min-max ranges)."""
    from litert_quantizer import recipe_manager
    from litert_quantizer.algorithm_manager import AlgorithmName
    from litert_quantizer.qtyping import TFLOperationName

    if p.recipe is not None:
        return list(p.recipe_content())
    mode = p.mode
    algorithm = AlgorithmName[ALGORITHM_KEYS[p.algorithm]]
    every = {"regex": ".*", "operation_name": TFLOperationName.ALL_SUPPORTED}
    manager = recipe_manager.RecipeManager()
    if mode == "float16":
        manager.add_weight_only_config(
            **every, num_bits=16, granularity=_granularity(p), algorithm_key=AlgorithmName.FLOAT_CASTING
        )
    elif mode == "dynamic":
        manager.add_dynamic_config(**every, num_bits=p.weight_bits, granularity=_granularity(p), algorithm_key=algorithm)
    elif mode == "weight_only":
        manager.add_weight_only_config(**every, num_bits=p.weight_bits, granularity=_granularity(p), algorithm_key=algorithm)
    else:
        manager.add_static_config(
            **every,
            activation_num_bits=16 if mode == "int16x8" else 8,
            weight_num_bits=p.weight_bits,
            weight_granularity=_granularity(p),
            algorithm_key=algorithm,
        )
    return manager.get_quantization_recipe()


def calibration_samples(float_bytes: bytes, representative, limit: int) -> tuple[str, list[dict[str, np.ndarray]]]:
    """The float model's signature key and `limit` samples of `representative`, by input name, as
    many per dict as the model takes (one, or its fixed batch: the last batch padded with its last
    sample): what the LiteRT Quantizer's calibration and validation take."""
    interpreter = make_interpreter(float_bytes)
    signatures = interpreter.get_signature_list()
    key = next(iter(signatures))
    details = interpreter.get_signature_runner(key).get_input_details()
    fixed = {int(d["shape_signature"][0]) for d in details.values()}
    batch = max(1, min(fixed)) if -1 not in fixed else 1
    arrays = {k: v[:limit].astype(np.float32) for k, v in representative.inputs(signatures[key]["inputs"]).items()}
    rows = len(next(iter(arrays.values())))
    out = []
    for start in range(0, rows, batch):
        chunk = {k: v[start : start + batch] for k, v in arrays.items()}
        short = batch - len(next(iter(chunk.values())))
        if short:
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) for k, v in chunk.items()}
        out.append(chunk)
    return key, out


def kept_float(model_bytes: bytes) -> dict[str, int]:
    """The ops of a quantized model that still compute in float (float outputs), by op type, with
    how many of each (QUANTIZE / DEQUANTIZE, the edges, not counted)."""
    counts: dict[str, int] = {}
    for node in read_flatbuffer(model_bytes).nodes:
        if node.op not in ("QUANTIZE", "DEQUANTIZE") and any(t.dtype == "FLOAT32" for t in node.outputs):
            counts[node.op] = counts.get(node.op, 0) + 1
    return counts


def quantize(float_bytes: bytes, p: Any, conversion, representative, notes: dict | None = None) -> bytes:
    """Quantize a float .tflite as the quantize params `p` ask; returns the quantized flatbuffer.
    What it had to do otherwise goes to `notes` (an op type its recipes do not name, kept float by
    its nodes)."""
    from litert_quantizer import Quantizer
    from litert_quantizer.qtyping import TFLOperationName

    qt = Quantizer(bytearray(float_bytes))
    qt.load_quantization_recipe(recipe_for(p))
    known = {op.value for op in TFLOperationName}
    by_node: list[str] = []
    for op in (op.upper() for op in p.keep_float_ops):
        if op in known:
            qt.update_quantization_recipe(regex=".*", operation_name=TFLOperationName(op), algorithm_key="no_quantize")
            continue
        # an op type the recipes cannot name (LOG, say) stays float by its nodes' output tensors
        nodes = [t.name for node in read_flatbuffer(float_bytes).nodes if node.op == op for t in node.outputs]
        if not nodes:
            raise InputError(
                f"keep_float_ops: the model has no `{op}` op",
                hint=f"use the model's op names: {', '.join(sorted({n.op for n in read_flatbuffer(float_bytes).nodes}))}",
            )
        by_node += [n for n in nodes if n not in by_node]
        if notes is not None:
            notes.setdefault("kept_float_by_node", {})[op] = nodes
    # The recipes quantize the graph's inputs and outputs too (int8 I/O); `io: float`, the default,
    # keeps them float as the converter engine does: QUANTIZE/DEQUANTIZE at the edges.
    for op, io_type in (
        (TFLOperationName.INPUT, conversion.inference_input_type),
        (TFLOperationName.OUTPUT, conversion.inference_output_type),
    ):
        if io_type == "float32":
            qt.update_quantization_recipe(regex=".*", operation_name=op, algorithm_key="no_quantize")
    nodes = list(p.keep_float_nodes) + [n for n in by_node if n not in p.keep_float_nodes]
    if p.keep_float_outputs:
        nodes += [n for n in branch_nodes(float_bytes, p.keep_float_outputs) if n not in nodes]
    for node in nodes:
        qt.update_quantization_recipe(
            regex=re.escape(node), operation_name=TFLOperationName.ALL_SUPPORTED, algorithm_key="no_quantize"
        )
    calibration = None
    if qt.need_calibration:
        if representative is None:
            raise InputError(f"quantization `{p.mode}` needs representative data", hint="add `data: {calibration: <URI>}`")
        key, samples = calibration_samples(float_bytes, representative, len(representative))
        calibration = qt.calibrate({key: samples}, num_threads=1)
    out = bytes(qt.quantize(calibration, enable_progress_report=False).quantized_model)
    if _unchanged(float_bytes, out):
        # litert-quantizer 0.11 returns the float model when no op takes the recipe (weight-only
        # blockwise, 2-bit weights): a silent no-op must not pass for a quantized model
        raise InputError(
            f"the LiteRT Quantizer quantized no tensor with this recipe ({'recipe' if p.recipe else p.mode}, "
            f"int{p.weight_bits} weights, block {p.block_size or 'none'}, {p.algorithm})",
            hint="blockwise weights need mode dynamic with weight_bits 4; see docs/manifest.md for the combinations",
        )
    return out


def _unchanged(float_bytes: bytes, out: bytes) -> bool:
    before, after = read_flatbuffer(float_bytes), read_flatbuffer(out)
    return before.constant_dtypes() == after.constant_dtypes() and before.activation_dtypes() == after.activation_dtypes()


def per_tensor_errors(float_bytes: bytes, quantized: bytes, inputs, samples: int) -> list[dict[str, Any]]:
    """Per-layer error of a LiteRT Quantizer model: the LiteRT Quantizer's comparison of every
    tensor of the float and the quantized model on `samples` inputs (its model validator), turned
    into the error each op adds.

    A tensor's relative error is the RMS of (quantized - float) over the float tensor's RMS; errors
    propagate, so each op is charged what it adds over the worst of its inputs (``rmse/scale``:
    relative error, where the converter's debugger gives quantization steps). Rows worst first.
    """
    from litert_quantizer import model_validator
    from litert_quantizer.utils import validation_utils

    key, data = calibration_samples(float_bytes, inputs, samples)
    result = model_validator.compare_model(
        bytes(float_bytes),
        bytes(quantized),
        {key: data},
        [validation_utils.ValidationErrorMetric.MSE],
        num_threads=1,
    )
    mse = {name: values["mse"] for name, values in result.get_all_tensor_results().items()}
    # a float reference RMS per tensor: the float model's own tensors on the first samples
    power = _tensor_power(float_bytes, key, data[: min(len(data), 8)], set(mse))
    relative = {n: float(np.sqrt(mse[n] / power[n])) if power.get(n) else 0.0 for n in mse}
    rows = []
    for node in read_flatbuffer(float_bytes).nodes:
        for out in node.outputs:
            if out.name not in relative:
                continue
            before = max((relative.get(t.name, 0.0) for t in node.inputs if not t.is_constant), default=0.0)
            rows.append(
                {
                    "op": node.op,
                    "tensor": out.name,
                    "rmse/scale": round(max(0.0, relative[out.name] - before), 4),
                    "relative_error": round(relative[out.name], 4),
                    "inputs": [t.name for t in node.inputs if not t.is_constant],  # the tensors feeding it
                }
            )
    rows.sort(key=lambda r: (-r["rmse/scale"], r["tensor"]))
    return rows


def _tensor_power(model: bytes, key: str, data: list[dict[str, np.ndarray]], names: set[str]) -> dict[str, float]:
    """Mean square of each named tensor of `model` over `data` (all tensors preserved)."""
    interpreter = make_interpreter(model, preserve_all_tensors=True)
    runner = interpreter.get_signature_runner(key)
    details = {d["name"]: d["index"] for d in interpreter.get_tensor_details() if d["name"] in names}
    sums: dict[str, float] = {}
    for sample in data:
        runner(**sample)
        for name, index in details.items():
            try:
                value = interpreter.get_tensor(index)
            except ValueError:
                continue
            sums[name] = sums.get(name, 0.0) + float(np.mean(np.square(value.astype(np.float64))))
    return {n: v / len(data) for n, v in sums.items()}
