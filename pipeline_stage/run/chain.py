"""The chain runner: one source model and chains run on it, each to a typed result.

It converts the float baseline once and runs a chain: ``model`` steps on the source's model, the
one conversion after the last ``convert`` step (the source plugin's float conversion, or the
quantization engine a step asked for), ``tflite`` steps on the bytes, each step measured
(:mod:`pipeline_stage.run.measuring`) on the evaluation context's data
(:mod:`pipeline_stage.run.evaluation`). It knows phases and steps, never a particular plugin, and
nothing of MLflow runs: what a chain logs goes to a :class:`RunSink` (the stage's MLflow run, or a
search trial's folder). The stage and the search trials use this public API only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline_stage.contract.engines import QuantizationEngine, QuantizationJob
from pipeline_stage.contract.errors import InputError, PluginError, plugin_failures
from pipeline_stage.contract.report import ConversionRecord, ObserverContext, StepRecord
from pipeline_stage.contract.steps import ConversionSettings, Phase, Step, StepContext
from pipeline_stage.engine.tf_env import captured_output
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

    def check_chain(self, steps: list[Step], *, search: bool = False) -> None:
        """Refuse, before any work, a chain the source cannot take: each step's `check_source`, and
        `model` steps on a source without a model they can edit (without a search, whose other
        candidates may do without them)."""
        for step in steps:
            step.check_source(self.source.name)
        if self.source.model is None and not search:
            for step in steps:
                if step.phase is Phase.MODEL:
                    raise type(self.source).refuse_edit(step.name, self.source.info.uri)

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
        float_bytes = self.source.to_float_tflite(self._settings(), self.source.model, self.workdir / "convert-baseline.log")
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

    def engine(self, name: str) -> QuantizationEngine:
        """The installed quantization engine `name`, checked against the source's kind."""
        provided = self.host.engines.get(name)
        if provided is None:
            raise InputError(
                f"no quantization engine `{name}` is installed (engines: {', '.join(sorted(self.host.engines)) or 'none'})",
                hint="install the plugin that provides it (`pipeline-stage plugins` lists the engines)",
            )
        engine = provided.cls()
        if not engine.accepts(self.source.name):
            raise InputError(
                f"engine `{name}` does not take {self.source.title or self.source.name} (it takes: {', '.join(engine.source_kinds)})",
                hint="use another engine (`engine: auto` picks one that takes it)",
            )
        return engine

    def quantize(self, engine: QuantizationEngine, job: QuantizationJob) -> bytes:
        """The engine's quantized .tflite; what it raises other than a StageError names the engine."""
        request = job.request
        if request.calibration_data:
            data = self.evaluation.load(request.calibration_data)
            self.progress("convert")(
                f"{request.mode} ({request.engine}): calibrating on {min(len(data), request.calibration_samples)} samples"
            )
        dist = self.host.engines[engine.name].distribution
        with plugin_failures(f"quantization engine `{engine.name}` (distribution `{dist}`)"):
            with captured_output(job.log_path):  # what the engine prints goes to the conversion's log
                out = engine.quantize(job)
        if not isinstance(out, (bytes, bytearray)):
            raise PluginError(f"quantization engine `{engine.name}` returned {type(out).__name__}, expected the .tflite bytes")
        return bytes(out)

    def _apply(self, step: Step, index: int, subject: Any, ctx: StepContext) -> Any:
        dist = self.host.steps[step.name].distribution
        with plugin_failures(f"step {index + 1} `{step.name}` (distribution `{dist}`)"):
            return step.apply(subject, ctx)

    def run_chain(self, steps: list[Step], sink: RunSink, *, float_bytes: bytes | None = None) -> ChainResult:
        """Run one chain on the source model: model steps, the one conversion, tflite steps, each
        step measured on `evaluation.per_step`.

        `float_bytes` (the baseline's float conversion) is reused when the chain asks nothing of the
        conversion, and as the float model an engine quantizes when the model and the float options
        are the baseline's.
        """
        src, hook, ev = self.source, self.host.hook, self.evaluation
        per_step = list(ev.spec.per_step)
        settings = self._settings()
        records: list[StepRecord] = []
        tags: dict[str, str] = {}
        model = src.model
        model_bytes: bytes | None = None
        conversion: Conversion | None = None
        last_convert = max((i for i, s in enumerate(steps) if s.phase is Phase.CONVERT), default=None)
        transformed = any(s.phase is Phase.MODEL for s in steps)

        for i, step in enumerate(steps):
            if step.phase is Phase.TFLITE and model_bytes is None:
                conversion = self._convert(settings, model, sink, float_bytes if not transformed else None)
                model_bytes = conversion.model_bytes
            hook.before_step(step=step, index=i, context=self.context)
            ctx = StepContext(
                workdir=self.workdir,
                load_data=ev.load,
                samples=ev.sample_inputs,
                log=self.progress(step.name),
                model=model,
                conversion=settings,
                source_kind=src.name,
                float_model=conversion.float_model if conversion else None,
                per_layer_errors=conversion.per_layer_errors if conversion else None,
            )
            t = time.perf_counter()
            if step.phase is Phase.MODEL:
                if model is None:
                    raise type(self.source).refuse_edit(step.name, self.source.info.uri)
                model = self._apply(step, i, model, ctx)
                model_now = model
                metrics = measure(
                    self.host,
                    ev,
                    self.prediction_metrics(per_step),
                    outputs=lambda: ev.predict(lambda batch: src.predict_batch(batch, model=model_now)),
                ).values
            elif step.phase is Phase.CONVERT:
                self._apply(step, i, settings, ctx)
                metrics = {}
                if i == last_convert:
                    conversion = self._convert(settings, model, sink, float_bytes if not transformed else None, ctx.notes)
                    model_bytes = conversion.model_bytes
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
            conversion = self._convert(settings, model, sink, float_bytes if not transformed else None)
            model_bytes = conversion.model_bytes
        return ChainResult(model_bytes, records, conversion.record if conversion else None, tags)

    def _convert(
        self, settings: ConversionSettings, model: Any, sink: RunSink, baseline_float: bytes | None, notes: dict | None = None
    ) -> "Conversion":
        """The chain's one conversion: the baseline's float model when nothing is asked of it, the
        source's float conversion, or the requested engine's quantization (handed the float model as
        the source gives it to engines, the baseline's when the float options are the baseline's);
        what the source's files hold beside the graph carried over. The engine's notes go to `notes`
        (the notes of the step that asked for it)."""
        from pipeline_stage.engine.flatbuffer import read as read_flatbuffer

        t = time.perf_counter()
        log_path = self.workdir / "convert.log"
        same_float = baseline_float is not None and settings.float_part() == self._settings()
        request = settings.quantization
        floats: dict[str, bytes] = {}

        def convert_float() -> bytes:
            if "bytes" not in floats:
                made = baseline_float if same_float else self.source.to_float_tflite(settings.float_part(), model, log_path)
                floats["bytes"] = self.source.for_engines(made)
            return floats["bytes"]

        per_layer = None
        if request is None and same_float and not settings.set_by:
            out = baseline_float  # nothing asked of the conversion: the baseline's is the same one
        elif request is None:
            out = self.source.to_float_tflite(settings, model, log_path)
        else:
            if self.source.already_quantized == "integer":
                raise InputError(
                    f"`{self.source.info.uri}` is already fully quantized (integer activations): quantizing it again "
                    "would only add error",
                    hint="drop the quantize step (tflite steps such as strip_ops, delegates and analyze still run on it), "
                    "or give the float model it was made from",
                )
            engine = self.engine(request.engine)
            job = QuantizationJob(
                request=request,
                conversion=settings,
                source=self.source,
                model=model,
                load_data=self.evaluation.load,
                workdir=self.workdir,
                log_path=log_path,
                log=self.progress("convert"),
                convert_float=convert_float,
            )
            out = self.quantize(engine, job)
            if job.notes and notes is not None:
                notes["engine"] = job.notes
            evaluation = self.evaluation.load

            def per_layer(quantized: bytes, samples: int) -> list[dict] | str:
                return engine.per_layer_errors(job, quantized, evaluation("evaluation"), samples)

        out = self.source.carry_over(out)
        if log_path.exists():
            sink.log_artifact(log_path)
        record = ConversionRecord(
            settings=settings.record(),
            seconds=round(time.perf_counter() - t, 3),
            flatbuffer=read_flatbuffer(out).summary(),
        )
        return Conversion(out, record, floats.get("bytes"), per_layer)


@dataclass(frozen=True)
class Conversion:
    """A chain's conversion: the .tflite, its record, the float model an engine quantized (when it
    asked for one) and the engine's per-layer error (None without a quantization)."""

    model_bytes: bytes
    record: ConversionRecord
    float_model: bytes | None
    per_layer_errors: Any
