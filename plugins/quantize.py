"""Built-in step `quantize`: quantization settings for the one TFLite conversion.

Post-training modes run in the converter (``engine: converter``) or, on the float model, in the
LiteRT Quantizer (``engine: litert``). ``mode: qat`` fine-tunes a quantization-aware copy of the
model with tfmot (through the tf_keras bridge, in a child process) and converts that to int8.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline_stage import (
    Chain,
    ConversionSettings,
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


class QuantizeParams(Params):
    mode: Literal["dynamic", "int8", "float16", "int16x8", "qat"] = Field(
        "int8",
        description=(
            "dynamic: int8 weights, float activations; int8: full integer (weights and activations, "
            "calibrated); float16: float16 weights; int16x8: int16 activations with int8 weights (calibrated); "
            "qat: quantization-aware training (tfmot) on the `training` data for `qat_epochs`, then full int8."
        ),
    )
    engine: Literal["converter", "litert"] = Field(
        "converter",
        description=(
            "converter: quantize during TFLite conversion; litert: convert to float, then quantize with the "
            "LiteRT Quantizer (litert-quantizer; Google's recommended route). Modes dynamic, int8, int16x8."
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
            "evens them on chain models). Modes dynamic, int8, int16x8."
        ),
    )
    keep_float_ops: list[str] = Field(
        default_factory=list,
        description=(
            "Selective quantization (mode int8): op types kept in float, e.g. [MUL, ADD]; the converter's "
            "quantization debugger denylists them."
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
    def _io_fits_mode(self) -> "QuantizeParams":
        allowed = {"int8": {"float", "int8"}, "qat": {"float", "int8"}, "int16x8": {"float", "int16"}}.get(self.mode, {"float"})
        if self.engine == "litert":
            if self.mode not in ("dynamic", "int8", "int16x8"):
                raise ValueError(f"engine litert offers modes dynamic, int8 and int16x8, not `{self.mode}`; use engine converter")
        if self.io not in allowed:
            raise ValueError(
                f"io `{self.io}` does not fit mode `{self.mode}` with engine `{self.engine}`; use one of {sorted(allowed)}"
            )
        if not self.per_channel and self.mode not in ("dynamic", "int8", "int16x8"):
            raise ValueError(f"per_channel: false applies to post-training modes dynamic, int8 and int16x8, not `{self.mode}`")
        if (self.keep_float_ops or self.keep_float_nodes or self.keep_float_outputs) and self.mode != "int8":
            raise ValueError(
                "keep_float_ops / keep_float_nodes / keep_float_outputs select what stays float in a full-int8 model: use mode int8"
            )
        return self


class Quantize(Step):
    """Quantization: dynamic range, full int8, float16, int16x8 (post-training) or qat; two engines."""

    name = "quantize"
    phase = Phase.CONVERT
    Params = QuantizeParams

    def required_data(self) -> set[str]:
        if self.params.mode == "qat":
            return {"training", self.params.calibration_data}
        return {self.params.calibration_data} if self.params.mode in ("int8", "int16x8") else set()

    def expected_cost(self) -> float:
        return 2.0 + self.params.qat_epochs if self.params.mode == "qat" else 1.0

    def apply(self, settings: ConversionSettings, ctx: StepContext) -> None:
        p = self.params
        settings.claim("quantization", self.name)
        settings.quantization = p.mode
        settings.engine = p.engine
        if p.mode == "qat":
            settings.training_data = "training"
            settings.fine_tune = {
                "epochs": p.qat_epochs,
                "learning_rate": p.qat_learning_rate,
                "batch_size": p.qat_batch_size,
                "seed": p.seed,
            }
        if p.mode in ("int8", "int16x8", "qat"):
            settings.representative_data = p.calibration_data
            settings.calibration_samples = p.calibration_samples
        settings.per_channel = p.per_channel
        settings.keep_float_ops = [op.upper() for op in p.keep_float_ops]
        settings.keep_float_nodes = list(p.keep_float_nodes)
        settings.keep_float_outputs = list(p.keep_float_outputs)
        io_type = {"float": "float32", "int8": "int8", "int16": "int16"}[p.io]
        settings.inference_input_type = settings.inference_output_type = io_type
        ctx.notes["conversion"] = {"quantization": p.mode, "io": io_type, "engine": p.engine}
        if not p.per_channel:
            ctx.notes["conversion"]["weight_scales"] = "per tensor"
        if p.keep_float_ops or p.keep_float_nodes or p.keep_float_outputs:
            kept = {"ops": settings.keep_float_ops, "nodes": settings.keep_float_nodes}
            ctx.notes["conversion"]["kept_float"] = kept | (
                {"outputs": settings.keep_float_outputs} if p.keep_float_outputs else {}
            )


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
        if facts.source_kind == "tflite":
            return []  # a .tflite source has only the LiteRT Quantizer
        other = "litert" if _quantize(chain).engine == "converter" else "converter"
        return [(f"engine {other}", edited(chain, "quantize", engine=other))]


class OtherModes(_OnFullInt8):
    """Quantize with another mode (dynamic, float16, int16x8) when full int8 cannot pass."""

    name = "modes"
    kind = "alternative"
    cost = 3.0  # a fallback: tried only when cheaper moves and refining found nothing

    def propose(self, chain: Chain, facts: ModelFacts) -> list[tuple[str, Chain]]:
        written = step_params(chain, "quantize")
        out = []
        for mode in ("dynamic", "float16", "int16x8"):
            if mode == "float16" and facts.source_kind == "tflite":
                continue  # float16 is the converter's, which needs the TensorFlow model
            # what only full int8 takes (selective float, integer I/O) goes; float16 is per-tensor
            # by nature and the converter's alone
            drop = {"keep_float_ops", "keep_float_nodes", "keep_float_outputs", "io"} | (
                {"per_channel", "engine"} if mode == "float16" else set()
            )
            params = {k: v for k, v in written.items() if k not in drop}
            out.append((f"mode {mode}", edited([(n, p if n != "quantize" else params) for n, p in chain], "quantize", mode=mode)))
        return out


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
    """Shared by the two per-layer moves: they refine a full-int8 converter chain, ranked by the
    per-layer quantization error that `analyze` measures in the first round."""

    requirement = "`quantize: {mode: int8}` (engine converter) in the chain"

    def applies(self, chain: Chain) -> bool:
        return super().applies(chain) and _quantize(chain).engine == "converter"

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
    register(KeepFloatOutputs)
    register(KeepFloatOps)
    register(KeepFloatNodes)
