"""The chain runner: one source model and chains run on it, each to a typed result.

It converts the float baseline once and runs a chain: ``model`` steps on the Keras model, the one
conversion after the last ``convert`` step, ``tflite`` steps on the bytes, each step measured
(:mod:`pipeline_stage.run.measuring`) on the evaluation context's data
(:mod:`pipeline_stage.run.evaluation`). It knows phases and steps, never a particular plugin, and
nothing of MLflow runs: what a chain logs goes to a :class:`RunSink` (the stage's MLflow run, or a
search trial's folder). The stage and the search trials use this public API only.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline_stage.contract.errors import InputError, PluginError, StageError
from pipeline_stage.contract.report import ConversionRecord, ObserverContext, StepRecord
from pipeline_stage.contract.steps import ConversionSettings, Phase, Step, StepContext
from pipeline_stage.engine.convert import float_settings
from pipeline_stage.engine.source_model import keras_predict_batch
from pipeline_stage.host.plugin_host import PluginHost
from pipeline_stage.manifest.schema import ConversionSpec
from pipeline_stage.run.evaluation import EvaluationContext
from pipeline_stage.run.measuring import measure
from pipeline_stage.run.progress import Progress


class RunSink(Protocol):
    """Where a chain's metrics and artifacts go."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, local: Path, artifact_path: str | None = None) -> None: ...


@dataclass(frozen=True)
class Baseline:
    """The unoptimized model, measured once: the source model for prediction metrics, its float
    conversion for flatbuffer metrics (and every metric of the float .tflite on its own, latency
    timed alone: what the report shows and a search ranks its trials against)."""

    float_bytes: bytes
    metrics: dict[str, float]
    tflite_metrics: dict[str, float]
    flatbuffer: dict[str, Any]
    seconds: float


@dataclass(frozen=True)
class ChainResult:
    """One chain, run: the final .tflite, a record per step, the conversion, and the tags its steps
    asked to put on the registered version."""

    model_bytes: bytes
    records: list[StepRecord]
    conversion: ConversionRecord | None
    tags: dict[str, str]


class ChainRunner:
    """Runs chains of configured steps on one loaded source model, measuring on `evaluation`'s data
    (see the module docstring)."""

    def __init__(
        self,
        host: PluginHost,
        evaluation: EvaluationContext,
        conversion: ConversionSpec,
        workdir: Path,
        *,
        progress: Progress,
        context: ObserverContext,
    ):
        self.host, self.evaluation, self.source = host, evaluation, evaluation.source
        self.conversion, self.workdir, self.progress, self.context = conversion, workdir, progress, context

    def _not_keras(self, step: Step) -> InputError:
        what = "a .tflite file" if self.source.kind == "tflite" else "a SavedModel"
        return InputError(
            f"step `{step.name}` works on Keras models, but `{self.source.info.uri}` is {what}",
            hint="drop the step, or give the Keras model (mlflow.tensorflow.log_model) it came from",
        )

    def check_chain(self, steps: list[Step], *, search: bool = False) -> None:
        """Refuse, before any work, a chain the source cannot take: each step's `check_source`, and
        `model` steps on a source that is not a Keras model (without a search, whose other
        candidates may do without them)."""
        for step in steps:
            step.check_source(self.source.kind)
        if self.source.keras_model is None and not search:
            for step in steps:
                if step.phase is Phase.MODEL:
                    raise self._not_keras(step)

    def higher_is_better(self, names: list[str]) -> dict[str, bool]:
        return {n: self.host.metric_class(n).higher_is_better for n in names}

    def prediction_metrics(self, names: list[str]) -> list[str]:
        return [n for n in names if self.host.metric_class(n).uses == "predictions"]

    def baseline(self, names: list[str]) -> Baseline:
        """Convert the source model to float once and measure it (`names`), and the source model itself."""
        from pipeline_stage.engine.flatbuffer import read as read_flatbuffer

        t0 = time.perf_counter()
        ev = self.evaluation.evaluation
        self.progress("baseline")(
            "float conversion, then " + (f"evaluation on {len(ev)} samples" if ev is not None else "measurements")
        )
        float_bytes = self.convert(self._settings(), self.source.keras_model, log_name="convert-baseline.log")
        tflite_metrics = measure(self.host, self.evaluation, names, model_bytes=float_bytes).values
        metrics = dict(tflite_metrics)
        # the source model's own predictions are the reference outputs, computed once
        metrics.update(
            measure(self.host, self.evaluation, self.prediction_metrics(names), outputs=self.evaluation.reference_outputs).values
        )
        return Baseline(
            float_bytes, metrics, tflite_metrics, read_flatbuffer(float_bytes).summary(), round(time.perf_counter() - t0, 3)
        )

    # -- the chain --------------------------------------------------------------------------
    def _settings(self) -> ConversionSettings:
        return ConversionSettings(
            allow_select_tf_ops=self.conversion.allow_select_tf_ops, allow_custom_ops=self.conversion.allow_custom_ops
        )

    def convert(
        self, settings: ConversionSettings, keras_model: Any, *, log_name: str = "convert.log", float_model: bytes | None = None
    ) -> bytes:
        """The one conversion of a chain (or the baseline's), with the data its settings name
        (`float_model`: engine litert's float .tflite, when the chain already has it)."""
        from pipeline_stage.engine.convert import convert

        load = self.evaluation.load
        representative = load(settings.representative_data) if settings.representative_data else None
        training = load(settings.training_data) if settings.training_data else None
        if representative is not None:
            self.progress("convert")(
                f"{settings.quantization} ({settings.engine}): calibrating on "
                f"{min(len(representative), settings.calibration_samples)} samples"
            )
        return convert(
            self.source,
            settings,
            keras_model=keras_model,
            representative=representative,
            training=training,
            log_path=self.workdir / log_name,
            log=self.progress("convert"),
            float_model=float_model,
        )

    def _apply(self, step: Step, index: int, subject: Any, ctx: StepContext) -> Any:
        try:
            return step.apply(subject, ctx)
        except StageError:
            raise
        except Exception as exc:
            dist = self.host.steps[step.name].distribution
            raise PluginError(
                f"step {index + 1} `{step.name}` (distribution `{dist}`) failed: {type(exc).__name__}: {exc}"
            ) from exc

    def run_chain(self, steps: list[Step], sink: RunSink, *, float_bytes: bytes | None = None) -> ChainResult:
        """Run one chain on the source model: model steps, the one conversion, tflite steps, each
        step measured on `evaluation.per_step`.

        `float_bytes` (the baseline's float conversion) is reused when the chain asks nothing of the
        conversion.
        """
        from pipeline_stage.engine.flatbuffer import read as read_flatbuffer

        src, hook, ev = self.source, self.host.hook, self.evaluation
        per_step = list(ev.spec.per_step)
        settings = self._settings()
        records: list[StepRecord] = []
        tags: dict[str, str] = {}
        keras_model = src.keras_model
        model_bytes: bytes | None = None
        conversion: ConversionRecord | None = None
        float_model: bytes | None = None  # engine litert: the float .tflite it quantized
        last_convert = max((i for i, s in enumerate(steps) if s.phase is Phase.CONVERT), default=None)

        def do_convert() -> bytes:
            nonlocal conversion, float_model
            t = time.perf_counter()
            transformed = any(s.phase is Phase.MODEL for s in steps)
            # the baseline's float conversion is this chain's when the model and the converter's
            # options are the same
            same_float = float_bytes is not None and not transformed and float_settings(settings) == self._settings()
            if same_float and settings.quantization is None and not settings.set_by:
                out = float_bytes  # nothing asked of the conversion: the baseline's is the same one
            else:
                if settings.engine == "litert" and settings.quantization is not None:
                    float_model = float_bytes if same_float else self.convert(float_settings(settings), keras_model)
                out = self.convert(settings, keras_model, float_model=float_model)
                sink.log_artifact(self.workdir / "convert.log")
            conversion = ConversionRecord(
                settings={k: v for k, v in dataclasses.asdict(settings).items() if k != "set_by"},
                seconds=round(time.perf_counter() - t, 3),
                flatbuffer=read_flatbuffer(out).summary(),
            )
            return out

        for i, step in enumerate(steps):
            if step.phase is Phase.TFLITE and model_bytes is None:
                model_bytes = do_convert()
            hook.before_step(step=step, index=i, context=self.context)
            ctx = StepContext(
                workdir=self.workdir,
                load_data=ev.load,
                samples=ev.sample_inputs,
                log=self.progress(step.name),
                model=keras_model,
                conversion=settings,
                source_kind=src.kind,
                float_model=float_model,
            )
            t = time.perf_counter()
            if step.phase is Phase.MODEL:
                if keras_model is None:
                    raise self._not_keras(step)
                keras_model = self._apply(step, i, keras_model, ctx)
                model_now = keras_model
                metrics = measure(
                    self.host,
                    ev,
                    self.prediction_metrics(per_step),
                    outputs=lambda: ev.predict(lambda batch: keras_predict_batch(model_now, batch, ev.output_names)),
                ).values
            elif step.phase is Phase.CONVERT:
                self._apply(step, i, settings, ctx)
                metrics = {}
                if i == last_convert:
                    model_bytes = do_convert()
                    metrics = measure(self.host, ev, per_step, model_bytes=model_bytes).values
            else:
                model_bytes = self._apply(step, i, model_bytes, ctx)
                if not isinstance(model_bytes, (bytes, bytearray)):
                    raise PluginError(f"step `{step.name}` returned {type(model_bytes).__name__}, expected the .tflite bytes")
                model_bytes = bytes(model_bytes)
                metrics = measure(self.host, ev, per_step, model_bytes=model_bytes).values
            record = StepRecord(
                name=step.name,
                phase=step.phase.value,
                params=step.params.model_dump(mode="json"),
                metrics=metrics,
                seconds=round(time.perf_counter() - t, 3),
                notes=ctx.notes,
            )
            records.append(record)
            tags.update(ctx.tags)
            for path in ctx.artifacts.values():
                sink.log_artifact(Path(path), f"steps/{i}-{step.name}")
            sink.log_metrics({f"step.{i}.{step.name}.{k}": v for k, v in metrics.items()})
            hook.after_step(step=step, record=record, context=self.context)
        if model_bytes is None:
            model_bytes = do_convert()
        return ChainResult(model_bytes, records, conversion, tags)
