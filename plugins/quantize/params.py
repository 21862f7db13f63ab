"""The `quantize` step's params: the mode, the engine, and each built-in engine's knobs.

The built-in engines' knobs are params of the step itself (as manifests have written them since
the first release); each engine checks its own (``check_params``). A third-party engine takes its
settings under ``options``, validated by its own ``Params`` when the manifest is loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline_stage import Params
from pipeline_stage_plugins.quantize.converter_engine import ConverterEngine
from pipeline_stage_plugins.quantize.litert_engine import LiteRTEngine
from pipeline_stage_plugins.quantize.pt2e_engine import PT2EEngine

TENSORFLOW_SOURCES = ConverterEngine.source_kinds
PYTORCH_SOURCES = PT2EEngine.source_kinds
BUILT_IN_ENGINES = ("auto", ConverterEngine.name, LiteRTEngine.name, PT2EEngine.name)
INTEGER_MODES = LiteRTEngine.integer_modes
# The built-in engines' knobs: a third-party engine's settings go under `options` instead.
BUILT_IN_KNOBS = frozenset(
    {"weight_bits", "block_size", "algorithm", "recipe", "per_channel", "qat_epochs", "qat_learning_rate", "qat_batch_size"}
)


class QuantizeParams(Params):
    # Fields added after the chain digests were first pinned (tests/chain_digests.json): they count
    # in the digest only when set (see Params.digest_view).
    digest_since = frozenset({"weight_bits", "block_size", "algorithm", "recipe", "options"})

    mode: Literal["dynamic", "int8", "float16", "int16x8", "weight_only", "qat"] = Field(
        "int8",
        description=(
            "dynamic: int8 weights, activations quantized at run time; int8: full integer (weights and activations, "
            "calibrated); float16: float16 weights; int16x8: int16 activations with int8 weights (calibrated); "
            "weight_only: integer weights dequantized to float when the model loads, float compute (engine litert); "
            "qat: quantization-aware training (tfmot) on the `training` data for `qat_epochs`, then full int8 (engine converter)."
        ),
    )
    engine: str = Field(
        "auto",
        pattern=r"^[A-Za-z_][\w\-]*$",
        json_schema_extra={"examples": list(BUILT_IN_ENGINES)},
        description=(
            "auto: the converter where it can do what the params ask (a TensorFlow source, 8-bit min-max "
            "weights), else the LiteRT Quantizer (a .tflite source; weight_only, int4, blockwise, another "
            "algorithm, a recipe file; a PyTorch source); converter: quantize during TFLite conversion (needs the "
            "TensorFlow model); litert: convert to float, then quantize with the LiteRT Quantizer (litert-quantizer); "
            "pt2e: litert-torch's PT2E quantizer on a PyTorch model (modes int8 and dynamic); "
            "or the name of an installed third-party engine (`pipeline-stage plugins` lists them), whose "
            "settings go under `options`."
        ),
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="A third-party engine's settings, validated by the engine (the built-in engines take their params directly).",
    )
    weight_bits: Literal[8, 4] = Field(
        8, description="Bits per weight: 8, or 4 (engine litert; modes dynamic, weight_only, int8)."
    )
    block_size: Literal[0, 32, 64, 128, 256] = Field(
        0,
        description=(
            "Blockwise weight scales, one per `block_size` weights along the input dimension (engine litert, mode "
            "dynamic, weight_bits 4; the layer's input size must divide by it); 0: per channel or per tensor (`per_channel`)."
        ),
    )
    algorithm: Literal["min_max", "mse", "octav", "gptq", "hadamard"] = Field(
        "min_max",
        description=(
            "How weight ranges are chosen: min_max (both engines), or the LiteRT Quantizer's mse, octav, gptq and "
            "hadamard (its decomposed Hadamard rotation) for modes dynamic, int8, int16x8 and weight_only."
        ),
    )
    recipe: str | None = Field(
        None,
        description=(
            "A LiteRT Quantizer JSON recipe file (a list of {regex, operation, algorithm_key, op_config}) applied as it "
            "is (engine litert; `io` still decides the I/O types); its content counts in the chain digest. Leave `mode`, "
            "`weight_bits`, `block_size`, `algorithm` and `per_channel` unset with it."
        ),
    )
    io: Literal["float", "int8", "int16"] = Field(
        "float",
        description="Input/output tensor type: `float` keeps float I/O; `int8` (mode int8) or `int16` (mode int16x8) makes I/O integer too.",
    )
    calibration_samples: int = Field(200, ge=1, le=100000, description="Representative samples used for calibration.")
    calibration_data: Literal["calibration", "training"] = Field(
        "calibration", description="Which manifest data set calibrates the activation ranges."
    )
    per_channel: bool = Field(
        True,
        description=(
            "Weight scales per output channel (true, the converter's default) or one per tensor (false): "
            "per-channel stores a float32 scale and an int64 zero point for every channel of every weight "
            "and bias tensor, which is a quarter of an int8 MobileNetV2 at alpha 0.35; per-tensor drops it "
            "and may cost accuracy where channel ranges differ (check with a gate; `fuse: {equalize: true}` "
            "evens them on chain models). Modes dynamic, int8, int16x8, weight_only."
        ),
    )
    keep_float_ops: list[str] = Field(
        default_factory=list,
        description=(
            "Selective quantization (mode int8): op types kept in float, e.g. [MUL, ADD]; the converter's "
            "quantization debugger denylists them, the LiteRT Quantizer leaves them unquantized."
        ),
    )
    keep_float_nodes: list[str] = Field(
        default_factory=list,
        description=("Selective quantization (mode int8): nodes kept in float, by output tensor name (see `analyze`)."),
    )
    keep_float_outputs: list[str] = Field(
        default_factory=list,
        description=(
            "Selective quantization (mode int8) of a model with several outputs: every node that feeds only "
            "these outputs (by signature output name) stays float, so an output that int8 damages is computed "
            "in float from the shared int8 layers."
        ),
    )
    qat_epochs: int = Field(2, ge=1, le=1000, description="mode qat: fine-tuning epochs on the `training` data.")
    qat_learning_rate: float = Field(1e-4, gt=0, lt=1, description="mode qat: Adam learning rate.")
    qat_batch_size: int = Field(32, ge=1, le=65536, description="mode qat: fine-tuning batch size.")
    seed: int = Field(0, description="mode qat: random seed of the fine-tuning.")

    @model_validator(mode="after")
    def _combinations(self) -> "QuantizeParams":
        if self.engine not in BUILT_IN_ENGINES:
            stray = sorted(self.model_fields_set & BUILT_IN_KNOBS)
            if stray:
                raise ValueError(
                    f"{', '.join(stray)} {'is' if len(stray) == 1 else 'are'} the built-in engines' param"
                    f"{'' if len(stray) == 1 else 's'}: engine `{self.engine}` takes its settings under `options`"
                )
            return self
        if self.options:
            raise ValueError("`options` holds a third-party engine's settings; the built-in engines take their params directly")
        if self.recipe is not None:
            LiteRTEngine.check_recipe_params(self)
            return self
        litert_only = self.litert_only()
        if self.engine == ConverterEngine.name and litert_only:
            raise ValueError(
                f"{litert_only} is the LiteRT Quantizer's: use `engine: litert` (or leave `engine` at auto); the converter "
                f"offers modes {', '.join(ConverterEngine.modes)} with 8-bit min-max weights"
            )
        if self.engine == LiteRTEngine.name and self.mode not in LiteRTEngine.modes:
            raise ValueError(
                f"engine litert offers modes {', '.join(LiteRTEngine.modes)}, not `{self.mode}`; use engine converter (or auto)"
            )
        if self.engine == PT2EEngine.name:
            PT2EEngine.check_params(self)
        LiteRTEngine.check_params(self)
        allowed = {"int8": {"float", "int8"}, "qat": {"float", "int8"}, "int16x8": {"float", "int16"}}.get(self.mode, {"float"})
        if self.io not in allowed:
            raise ValueError(f"io `{self.io}` does not fit mode `{self.mode}`; use one of {sorted(allowed)}")
        if not self.per_channel and self.mode not in INTEGER_MODES:
            raise ValueError(f"per_channel: false applies to modes {', '.join(INTEGER_MODES)}, not `{self.mode}`")
        if (self.keep_float_ops or self.keep_float_nodes or self.keep_float_outputs) and self.mode != "int8":
            raise ValueError(
                "keep_float_ops / keep_float_nodes / keep_float_outputs select what stays float in a full-int8 model: use mode int8"
            )
        return self

    def litert_only(self) -> str:
        """What these params ask that only the LiteRT Quantizer does, in words ("" for nothing)."""
        if self.recipe is not None:
            return "a recipe file"
        asks = [
            text
            for text, asked in (
                ("mode weight_only", self.mode == "weight_only"),
                ("weight_bits 4", self.weight_bits == 4),
                (f"block_size {self.block_size}", self.block_size != 0),
                (f"algorithm {self.algorithm}", self.algorithm != "min_max"),
            )
            if asked
        ]
        return ", ".join(asks)

    def engine_for(self, source_kind: str) -> str:
        """The engine these params run on for a source of `source_kind` (see `engine`)."""
        if self.engine != "auto":
            return self.engine
        if source_kind not in TENSORFLOW_SOURCES or self.litert_only():
            return LiteRTEngine.name
        return ConverterEngine.name

    def recipe_content(self) -> list[dict]:
        """The recipe file's content (checked when the params were validated)."""
        return json.loads(Path(self.recipe).read_text())

    def digest_view(self) -> dict:
        # `auto` counts as the engine it picks for a TensorFlow source: a chain written before
        # `auto` (whose default was converter) keeps its digest; a .tflite source is another source.
        data = super().digest_view()
        data["engine"] = self.engine_for("keras")
        if self.recipe is not None:
            data["recipe_sha256"] = hashlib.sha256(Path(self.recipe).read_bytes()).hexdigest()
        return data


def recipe_needs_calibration(content: list[dict]) -> bool:
    """Whether a LiteRT Quantizer recipe quantizes activations (integer compute with an activation
    config), which needs calibration data."""
    return any(
        (r.get("op_config") or {}).get("activation_tensor_config") and r.get("algorithm_key") != "no_quantize" for r in content
    )


def support_rows() -> list[dict[str, str]]:
    """Mode x engine x source kind, as `pipeline-stage plugins` and docs/plugins.md show it."""
    rows = []
    converter, litert, pt2e = ConverterEngine.modes, LiteRTEngine.modes, PT2EEngine.modes
    for mode in ("dynamic", "int8", "int16x8", "float16", "weight_only", "qat"):
        if mode in converter and mode in litert:
            auto = "converter (litert for a .tflite source or litert-only params)"
        else:
            auto = "converter (TensorFlow source only)" if mode in converter else "litert"
        rows.append(
            {
                "mode": mode,
                "converter": "TensorFlow source" if mode in converter else "-",
                "litert": "any source" if mode in litert else "-",
                "pt2e": "PyTorch source" if mode in pt2e else "-",
                "auto picks": auto,
            }
        )
    return rows


def recipe_text(p: QuantizeParams) -> str:
    """The LiteRT Quantizer recipe these params resolve to, in words (the report's conversion notes)."""
    if p.recipe is not None:
        return f"recipe file {p.recipe} (sha256 {hashlib.sha256(Path(p.recipe).read_bytes()).hexdigest()[:12]})"
    if p.mode == "float16":
        return "float16 weights (float casting)"
    activations = {"dynamic": "dynamic int8", "int8": "int8", "int16x8": "int16", "weight_only": "float"}[p.mode]
    granularity = f"blockwise {p.block_size}" if p.block_size else ("per channel" if p.per_channel else "per tensor")
    return f"int{p.weight_bits} weights {granularity}, {activations} activations, {p.algorithm}"
