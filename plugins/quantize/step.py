"""The `quantize` step: it asks the conversion for a quantization engine and its settings.

``engine: auto`` (the default) picks the converter where it can do what the params ask (a
TensorFlow source, 8-bit min-max weights) and the LiteRT Quantizer otherwise; ``converter`` and
``litert`` name one; any other name is an installed third-party engine, given its ``options``.
"""

from __future__ import annotations

from pydantic import ValidationError

from pipeline_stage import ConversionSettings, InputError, Phase, QuantizationRequest, Step, StepContext
from pipeline_stage_plugins.quantize.converter_engine import ConverterEngine
from pipeline_stage_plugins.quantize.litert_engine import LiteRTEngine
from pipeline_stage_plugins.quantize.params import (
    BUILT_IN_ENGINES,
    PYTORCH_SOURCES,
    TENSORFLOW_SOURCES,
    QuantizeParams,
    recipe_needs_calibration,
    recipe_text,
    support_rows,
)
from pipeline_stage_plugins.quantize.pt2e_engine import PT2EEngine

IO_TYPES = {"float": "float32", "int8": "int8", "int16": "int16"}


class Quantize(Step):
    """Quantization: dynamic range, full int8, float16, int16x8, weight-only (post-training) or qat, on a pluggable engine."""

    name = "quantize"
    phase = Phase.CONVERT
    Params = QuantizeParams

    def __init__(self, params: QuantizeParams | None = None):
        super().__init__(params)
        self.engine_class = None  # a third-party engine's class, once check_plugins found it

    @classmethod
    def support_table(cls) -> list[dict[str, str]]:
        return support_rows()

    def required_data(self) -> set[str]:
        p = self.params
        if p.engine not in BUILT_IN_ENGINES:
            return {p.calibration_data} if p.mode in ("int8", "int16x8") else set()
        if p.mode == "qat" and p.recipe is None:
            return {"training", p.calibration_data}
        if p.recipe is not None:
            return {p.calibration_data} if recipe_needs_calibration(p.recipe_content()) else set()
        calibrated = p.mode in ("int8", "int16x8") or p.algorithm in LiteRTEngine.calibrated_algorithms
        return {p.calibration_data} if calibrated else set()

    def expected_cost(self) -> float:
        return 2.0 + self.params.qat_epochs if self.params.mode == "qat" and self.params.recipe is None else 1.0

    def check_plugins(self, installed) -> None:
        p = self.params
        if p.engine in BUILT_IN_ENGINES:
            return
        provided = installed.engines.get(p.engine)
        if provided is None:
            known = ", ".join(["auto", *sorted(installed.engines)])
            raise InputError(
                f"no quantization engine `{p.engine}` is installed (engines: {known})",
                hint="install the plugin that provides it (`pipeline-stage plugins` lists the engines), or use one of those",
            )
        cls = provided.cls
        if cls.modes and p.mode not in cls.modes:
            raise InputError(f"engine `{p.engine}` offers modes {', '.join(cls.modes)}, not `{p.mode}`")
        try:
            cls.Params.model_validate(p.options)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(part) for part in err["loc"])
            raise InputError(
                f"`options{'.' + where if where else ''}` for engine `{p.engine}`: {err['msg']}",
                hint=f"engine `{p.engine}` takes: {', '.join(cls.Params.model_fields) or 'no options'}",
            ) from None
        self.engine_class = cls

    def check_source(self, source_kind: str) -> None:
        p = self.params
        if p.engine not in BUILT_IN_ENGINES:
            if self.engine_class is not None and not self.engine_class().accepts(source_kind):
                raise InputError(
                    f"engine `{p.engine}` does not take a `{source_kind}` source (it takes: {', '.join(self.engine_class.source_kinds)})",
                    hint="use engine auto, or give a model of a kind it takes",
                )
            return
        if p.engine == PT2EEngine.name and source_kind not in PYTORCH_SOURCES:
            raise InputError(
                f"the source is a `{source_kind}` model: engine pt2e quantizes a PyTorch model (litert-torch's PT2E quantizer)",
                hint="leave `engine` at auto (or set `engine: litert`, or `converter` for a TensorFlow model)",
            )
        if source_kind in TENSORFLOW_SOURCES:
            return
        if p.engine == ConverterEngine.name:
            raise InputError(
                f"the source is a `{source_kind}` model: the converter engine needs the TensorFlow model it was converted from",
                hint=f"leave `engine` at auto (or set `engine: litert`): the LiteRT Quantizer quantizes any source's float "
                f".tflite (modes {', '.join(LiteRTEngine.modes)}); or give the Keras / SavedModel model",
            )
        if p.mode == "qat" and p.recipe is None:
            raise InputError(
                f"the source is a `{source_kind}` model: quantization-aware training fine-tunes the Keras model, which it has none of",
                hint=f"use a post-training mode ({', '.join(LiteRTEngine.modes)}), or give the Keras model",
            )

    def apply(self, settings: ConversionSettings, ctx: StepContext) -> None:
        p = self.params
        self.check_source(ctx.source_kind)
        engine = p.engine_for(ctx.source_kind)
        mode = "recipe" if p.recipe is not None else p.mode
        settings.claim("quantization", self.name)
        third_party = engine not in BUILT_IN_ENGINES
        calibrated = bool(self.required_data() - {"training"})
        settings.quantization = QuantizationRequest(
            engine=engine,
            settings=self.engine_class.Params.model_validate(p.options) if third_party else p,
            mode=mode,
            calibration_data=p.calibration_data if calibrated or mode in ("int8", "int16x8", "qat") else None,
            calibration_samples=p.calibration_samples,
            training_data="training" if mode == "qat" else None,
        )
        io_type = IO_TYPES[p.io]
        settings.inference_input_type = settings.inference_output_type = io_type
        notes = ctx.notes["conversion"] = {"quantization": mode, "io": io_type, "engine": engine}
        if p.engine == "auto":
            notes["engine_chosen_by"] = "auto"
        if engine == LiteRTEngine.name:
            notes["recipe"] = recipe_text(p)
        if not p.per_channel:
            notes["weight_scales"] = "per tensor"
        if p.keep_float_ops or p.keep_float_nodes or p.keep_float_outputs:
            kept = {"ops": [op.upper() for op in p.keep_float_ops], "nodes": list(p.keep_float_nodes)}
            notes["kept_float"] = kept | ({"outputs": list(p.keep_float_outputs)} if p.keep_float_outputs else {})
