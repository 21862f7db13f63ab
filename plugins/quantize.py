"""Built-in step `quantize`: quantization settings for the one TFLite conversion.

Post-training modes run in the converter (``engine: converter``) or, on the float model, in the
LiteRT Quantizer (``engine: litert``); ``engine: auto``, the default, picks per source and params
(``support_rows`` is the table). The LiteRT Quantizer's recipes are params: weight bits,
granularity (per channel, per tensor, blockwise), algorithm, or a JSON recipe file. ``mode: qat``
fine-tunes a quantization-aware copy of the model with tfmot (through the tf_keras bridge, in a
child process) and converts that to int8.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from pipeline_stage import (
    Chain,
    ConversionSettings,
    InputError,
    ModelFacts,
    Params,
    Phase,
    SearchMove,
    Step,
    StepContext,
    TrialView,
    edited,
    hookimpl,
    step_params,
)

# What each engine offers. The converter quantizes during the TFLite conversion, so it needs the
# TensorFlow model; the LiteRT Quantizer quantizes a float .tflite (any source: a TensorFlow model
# is converted to float first). `engine: auto` picks the converter where it works, so chains
# written before `auto` keep their engine, and the LiteRT Quantizer for a .tflite source and for
# what only it has.
TENSORFLOW_SOURCES = ("keras", "saved_model")
ENGINE_MODES = {
    "converter": ("dynamic", "int8", "float16", "int16x8", "qat"),
    "litert": ("dynamic", "int8", "float16", "int16x8", "weight_only"),
}
INTEGER_MODES = ("dynamic", "int8", "int16x8", "weight_only")  # the LiteRT Quantizer's integer recipes
CALIBRATED_ALGORITHMS = ("gptq",)  # it fits the weights to the layer's inputs: it needs calibration data


class QuantizeParams(Params):
    # Fields added after 0.1: they count in the chain digest only when set (see Params.digest_view).
    digest_since = frozenset({"weight_bits", "block_size", "algorithm", "recipe"})

    mode: Literal["dynamic", "int8", "float16", "int16x8", "weight_only", "qat"] = Field(
        "int8",
        description=(
            "dynamic: int8 weights, activations quantized at run time; int8: full integer (weights and activations, "
            "calibrated); float16: float16 weights; int16x8: int16 activations with int8 weights (calibrated); "
            "weight_only: integer weights dequantized to float when the model loads, float compute (engine litert); "
            "qat: quantization-aware training (tfmot) on the `training` data for `qat_epochs`, then full int8 (engine converter)."
        ),
    )
    engine: Literal["auto", "converter", "litert"] = Field(
        "auto",
        description=(
            "auto: the converter where it can do what the params ask (a TensorFlow source, 8-bit min-max "
            "weights), else the LiteRT Quantizer (a .tflite source; weight_only, int4, blockwise, another "
            "algorithm, a recipe file); converter: quantize during TFLite conversion (needs the TensorFlow "
            "model); litert: convert to float, then quantize with the LiteRT Quantizer (litert-quantizer)."
        ),
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
        if self.recipe is not None:
            _check_recipe_params(self)
            return self
        litert_only = self.litert_only()
        if self.engine == "converter" and litert_only:
            raise ValueError(
                f"{litert_only} is the LiteRT Quantizer's: use `engine: litert` (or leave `engine` at auto); the converter "
                f"offers modes {', '.join(ENGINE_MODES['converter'])} with 8-bit min-max weights"
            )
        if self.engine == "litert" and self.mode not in ENGINE_MODES["litert"]:
            raise ValueError(
                f"engine litert offers modes {', '.join(ENGINE_MODES['litert'])}, not `{self.mode}`; use engine converter (or auto)"
            )
        if self.weight_bits == 4 and self.mode not in ("dynamic", "weight_only", "int8"):
            raise ValueError(f"weight_bits 4 applies to modes dynamic, weight_only and int8, not `{self.mode}`")
        if self.block_size and (self.mode != "dynamic" or self.weight_bits != 4):
            raise ValueError(
                "block_size applies to mode dynamic with weight_bits 4 (the LiteRT Quantizer leaves other modes' "
                "weights unquantized at a block granularity)"
            )
        if self.block_size and self.algorithm == "mse":
            raise ValueError("block_size does not combine with algorithm mse; use min_max, octav, gptq or hadamard")
        if self.algorithm != "min_max" and self.mode not in INTEGER_MODES:
            raise ValueError(f"algorithm `{self.algorithm}` applies to modes {', '.join(INTEGER_MODES)}, not `{self.mode}`")
        allowed = {"int8": {"float", "int8"}, "qat": {"float", "int8"}, "int16x8": {"float", "int16"}}.get(self.mode, {"float"})
        if self.io not in allowed:
            raise ValueError(f"io `{self.io}` does not fit mode `{self.mode}`; use one of {sorted(allowed)}")
        if not self.per_channel and self.mode not in INTEGER_MODES:
            raise ValueError(f"per_channel: false applies to modes {', '.join(INTEGER_MODES)}, not `{self.mode}`")
        if not self.per_channel and self.block_size:
            raise ValueError("per_channel: false and block_size each choose the weight granularity: set one of them")
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
            return "litert"
        return "converter"

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


def _check_recipe_params(p: QuantizeParams) -> None:
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


def recipe_needs_calibration(content: list[dict]) -> bool:
    """Whether a LiteRT Quantizer recipe quantizes activations (integer compute with an activation
    config), which needs calibration data."""
    return any(
        (r.get("op_config") or {}).get("activation_tensor_config") and r.get("algorithm_key") != "no_quantize" for r in content
    )


def support_rows() -> list[dict[str, str]]:
    """Mode x engine x source kind, as `pipeline-stage plugins` and docs/plugins.md show it."""
    rows = []
    for mode in ("dynamic", "int8", "int16x8", "float16", "weight_only", "qat"):
        converter = "TensorFlow source" if mode in ENGINE_MODES["converter"] else "-"
        litert = "any source" if mode in ENGINE_MODES["litert"] else "-"
        if mode in ENGINE_MODES["converter"] and mode in ENGINE_MODES["litert"]:
            auto = "converter (litert for a .tflite source or litert-only params)"
        else:
            auto = "converter (TensorFlow source only)" if mode in ENGINE_MODES["converter"] else "litert"
        rows.append({"mode": mode, "converter": converter, "litert": litert, "auto picks": auto})
    return rows


class Quantize(Step):
    """Quantization: dynamic range, full int8, float16, int16x8, weight-only (post-training) or qat; two engines."""

    name = "quantize"
    phase = Phase.CONVERT
    Params = QuantizeParams

    @classmethod
    def support_table(cls) -> list[dict[str, str]]:
        return support_rows()

    def required_data(self) -> set[str]:
        p = self.params
        if p.mode == "qat" and p.recipe is None:
            return {"training", p.calibration_data}
        if p.recipe is not None:
            return {p.calibration_data} if recipe_needs_calibration(p.recipe_content()) else set()
        return {p.calibration_data} if p.mode in ("int8", "int16x8") or p.algorithm in CALIBRATED_ALGORITHMS else set()

    def expected_cost(self) -> float:
        return 2.0 + self.params.qat_epochs if self.params.mode == "qat" and self.params.recipe is None else 1.0

    def check_source(self, source_kind: str) -> None:
        p = self.params
        if source_kind in TENSORFLOW_SOURCES:
            return
        if p.engine == "converter":
            raise InputError(
                "the source is a .tflite file: the converter engine needs the TensorFlow model it was converted from",
                hint=f"leave `engine` at auto (or set `engine: litert`): the LiteRT Quantizer quantizes a .tflite "
                f"(modes {', '.join(ENGINE_MODES['litert'])}); or give the Keras / SavedModel model",
            )
        if p.mode == "qat" and p.recipe is None:
            raise InputError(
                "the source is a .tflite file: quantization-aware training fine-tunes the Keras model, which it has none of",
                hint=f"use a post-training mode ({', '.join(ENGINE_MODES['litert'])}), or give the Keras model",
            )

    def apply(self, settings: ConversionSettings, ctx: StepContext) -> None:
        p = self.params
        self.check_source(ctx.source_kind)
        engine = p.engine_for(ctx.source_kind)
        mode = "recipe" if p.recipe is not None else p.mode
        settings.claim("quantization", self.name)
        settings.quantization = mode
        settings.engine = engine
        if mode == "qat":
            settings.training_data = "training"
            settings.fine_tune = {
                "epochs": p.qat_epochs,
                "learning_rate": p.qat_learning_rate,
                "batch_size": p.qat_batch_size,
                "seed": p.seed,
            }
        if mode in ("int8", "int16x8", "qat") or (mode in ("recipe", "weight_only", "dynamic") and self.required_data()):
            settings.representative_data = p.calibration_data
            settings.calibration_samples = p.calibration_samples
        settings.per_channel = p.per_channel
        settings.weight_bits, settings.block_size, settings.algorithm = p.weight_bits, p.block_size, p.algorithm
        settings.recipe = p.recipe_content() if p.recipe is not None else None
        settings.keep_float_ops = [op.upper() for op in p.keep_float_ops]
        settings.keep_float_nodes = list(p.keep_float_nodes)
        settings.keep_float_outputs = list(p.keep_float_outputs)
        io_type = {"float": "float32", "int8": "int8", "int16": "int16"}[p.io]
        settings.inference_input_type = settings.inference_output_type = io_type
        notes = ctx.notes["conversion"] = {"quantization": mode, "io": io_type, "engine": engine}
        if p.engine == "auto":
            notes["engine_chosen_by"] = "auto"
        if engine == "litert":
            notes["recipe"] = _recipe_text(p)
        if not p.per_channel:
            notes["weight_scales"] = "per tensor"
        if p.keep_float_ops or p.keep_float_nodes or p.keep_float_outputs:
            kept = {"ops": settings.keep_float_ops, "nodes": settings.keep_float_nodes}
            notes["kept_float"] = kept | ({"outputs": settings.keep_float_outputs} if p.keep_float_outputs else {})


def _recipe_text(p: QuantizeParams) -> str:
    """The LiteRT Quantizer recipe these params resolve to, in words (the report's conversion notes)."""
    if p.recipe is not None:
        return f"recipe file {p.recipe} (sha256 {hashlib.sha256(Path(p.recipe).read_bytes()).hexdigest()[:12]})"
    if p.mode == "float16":
        return "float16 weights (float casting)"
    activations = {"dynamic": "dynamic int8", "int8": "int8", "int16x8": "int16", "weight_only": "float"}[p.mode]
    granularity = f"blockwise {p.block_size}" if p.block_size else ("per channel" if p.per_channel else "per tensor")
    return f"int{p.weight_bits} weights {granularity}, {activations} activations, {p.algorithm}"


@hookimpl
def register_steps(register):
    register(Quantize)


# -- search moves: what the `auto` search may change in a chain's quantize step ----------------------
def _quantize(chain: Chain) -> QuantizeParams | None:
    params = step_params(chain, "quantize")
    return None if params is None else QuantizeParams.model_validate(params)


class _OnFullInt8(SearchMove):
    """A move for chains that quantize to full int8 (the one rule every quantize move shares)."""

    requirement = "`quantize: {mode: int8}` in the chain"

    def applies(self, chain: Chain) -> bool:
        q = _quantize(chain)
        return q is not None and q.mode == "int8"


class OtherEngine(_OnFullInt8):
    """Quantize with the other engine (the converter <-> the LiteRT Quantizer), same params."""

    name = "engine"
    kind = "alternative"

    def propose(self, chain: Chain, facts: ModelFacts) -> list[tuple[str, Chain]]:
        q = _quantize(chain)
        if facts.source_kind not in TENSORFLOW_SOURCES or q.litert_only():
            return []  # only the LiteRT Quantizer can take it
        other = "litert" if q.engine_for(facts.source_kind) == "converter" else "converter"
        return [(f"engine {other}", edited(chain, "quantize", engine=other))]


def _rewritten(chain: Chain, drop: set[str], **params) -> Chain:
    """`chain` with its quantize step's params: the written ones less `drop`, plus `params`."""
    written = step_params(chain, "quantize")
    kept = {k: v for k, v in written.items() if k not in drop}
    return edited([(n, p if n != "quantize" else kept) for n, p in chain], "quantize", **params)


# what only full int8 takes (selective float, integer I/O)
_FULL_INT8_ONLY = {"keep_float_ops", "keep_float_nodes", "keep_float_outputs", "io"}


class OtherModes(_OnFullInt8):
    """Quantize with another mode (dynamic, float16, int16x8) when full int8 cannot pass."""

    name = "modes"
    kind = "alternative"
    cost = 3.0  # a fallback: tried only when cheaper moves and refining found nothing

    def propose(self, chain: Chain, facts: ModelFacts) -> list[tuple[str, Chain]]:
        out = []
        for mode in ("dynamic", "float16", "int16x8"):
            # float16 is per-tensor by nature; the engine goes back to auto, which picks one that can
            drop = _FULL_INT8_ONLY | ({"per_channel", "engine"} if mode == "float16" else set())
            if facts.source_kind not in TENSORFLOW_SOURCES:
                drop |= {"engine"}
            out.append((f"mode {mode}", _rewritten(chain, drop, mode=mode)))
        return out


# The LiteRT Quantizer's recipe families the `recipes` move tries, smallest weights last: each is
# (origin, params). Weight-only keeps float activations (what full int8 and dynamic quantize), so
# it serves models whose activations int8 cannot hold; int4 and blockwise int4 halve the weights
# again; gptq is a second algorithm for the int4 weights.
RECIPE_FAMILIES: tuple[tuple[str, dict], ...] = (
    ("weight-only int8", {"mode": "weight_only"}),
    ("weight-only int8 per tensor", {"mode": "weight_only", "per_channel": False}),
    ("weight-only int4", {"mode": "weight_only", "weight_bits": 4}),
    ("weight-only int4 gptq", {"mode": "weight_only", "weight_bits": 4, "algorithm": "gptq"}),
    ("dynamic int4 blockwise 32", {"mode": "dynamic", "weight_bits": 4, "block_size": 32}),
)


class LiteRTRecipes(_OnFullInt8):
    """Try the LiteRT Quantizer's other recipes: weight-only int8 and int4, gptq, blockwise int4.

    A tier after refining full int8 and before other modes: when no int8 chain can pass, the
    objective ranks these (size first when it says so)."""

    name = "recipes"
    kind = "alternative"
    cost = 2.0
    digest_when_named = True  # added in 0.2: searches written before it keep their digest

    def propose(self, chain: Chain, facts: ModelFacts) -> list[tuple[str, Chain]]:
        drop = _FULL_INT8_ONLY | {"engine", "per_channel"}  # auto: these run on the LiteRT Quantizer
        return [(f"recipe {origin}", _rewritten(chain, drop, **params)) for origin, params in RECIPE_FAMILIES]


class _Selective(_OnFullInt8):
    """A refine move that keeps one more thing float in a full-int8 chain: it edits the quantize
    step's list param `param`."""

    kind = "refine"
    param = ""

    def chosen(self, chain: Chain) -> list[str]:
        return list(step_params(chain, "quantize").get(self.param, []))

    def apply(self, chain: Chain, chosen: list[str]) -> Chain:
        return edited(chain, "quantize", **{self.param: chosen})


class KeepFloatOutputs(_Selective):
    """Keep one more output's own nodes in float (keep_float_outputs), the worst failing output first.

    For models with several outputs: the outputs come from the gates a trial failed, each output
    whose own value fails the gate (`<metric>.<output>`), worst first."""

    name = "keep_float_outputs"
    param = "keep_float_outputs"
    label = "keep output's nodes in float"

    def options(self, trial: TrialView) -> list[str]:
        ranked: list[str] = []
        for gate in trial.gates:
            ranked += [o for o in gate.failing_outputs if o not in ranked]
        return ranked


class _KeepFloat(_Selective):
    """Shared by the two per-layer moves: they refine a full-int8 chain on either engine, ranked by
    the per-layer quantization error that `analyze` measures in the first round (TensorFlow's
    QuantizationDebugger for the converter, the LiteRT Quantizer's comparison for litert)."""

    def instrument(self, chain: Chain) -> Chain:
        if all(name != "analyze" for name, _ in chain):
            return [*chain, ("analyze", {"top": 1000})]
        return chain


class KeepFloatOps(_KeepFloat):
    """Keep one more op type in float (keep_float_ops), worst quantization error first."""

    name = "keep_float_ops"
    param = "keep_float_ops"
    label = "keep op type in float"

    def options(self, trial: TrialView) -> list[str]:
        worst: dict[str, float] = {}
        for row in trial.per_layer:
            worst[row["op"]] = max(worst.get(row["op"], 0.0), row["rmse/scale"])
        return [op for op, _ in sorted(worst.items(), key=lambda kv: (-kv[1], kv[0]))]


class KeepFloatNodes(_KeepFloat):
    """Keep one more node in float (keep_float_nodes), worst quantization error first.

    At most `search.max_float_nodes` nodes."""

    name = "keep_float_nodes"
    param = "keep_float_nodes"
    label = "keep node in float"

    def options(self, trial: TrialView) -> list[str]:
        return [row["tensor"] for row in trial.per_layer]

    def limit(self, spec, options: list[str]) -> int:
        return spec.max_float_nodes


@hookimpl
def register_search_moves(register):
    register(OtherEngine)
    register(OtherModes)
    register(LiteRTRecipes)
    register(KeepFloatOutputs)
    register(KeepFloatOps)
    register(KeepFloatNodes)
