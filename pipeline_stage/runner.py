"""The runner: phases and steps, measurements, gates, registration. It knows no particular plugin."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_stage import __version__
from pipeline_stage.data import Dataset
from pipeline_stage.errors import GateFailed, InputError, PluginError, StageError, TrackingError
from pipeline_stage.evaluate import Evaluation, check_input_shape, default_threads
from pipeline_stage.manifest import DATA_SETS, LoadedManifest
from pipeline_stage.plugins import Registry
from pipeline_stage.report import to_markdown
from pipeline_stage.source import first_output
from pipeline_stage.steps import ConversionSettings, Phase, Step, StepContext, StepRecord
from pipeline_stage.tracking import configure, preflight, redact

SOURCE_RUN_PLACEHOLDER = "${source.run_id}"


@dataclass
class RunOptions:
    tracking_uri: str
    report_path: Path | None = None
    output_path: Path | None = None  # copy of the final .tflite (Kubeflow's Output[Model])
    workdir: Path | None = None  # kept when given; a temporary folder otherwise
    quiet: bool = False
    new_version: bool = False  # register even if an identical passing version exists


@dataclass
class RunContext:
    """What observers see of a run."""

    manifest: LoadedManifest
    registry: Registry
    options: RunOptions
    workdir: Path
    run_id: str | None = None
    quiet: bool = False
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> list[Step]:
        return self.manifest.steps


class Stage:
    """One execution of a manifest."""

    def __init__(self, loaded: LoadedManifest, registry: Registry, options: RunOptions):
        self.loaded = loaded
        self.m = loaded.manifest
        self.registry = registry
        self.options = options
        self.hook = registry.hook
        self._data: dict[str, Dataset] = {}
        self._step_tags: dict[str, str] = {}
        self.source = None

    # -- data -------------------------------------------------------------------------------
    def data_uri(self, name: str) -> str:
        uri = getattr(self.m.data, name)
        if SOURCE_RUN_PLACEHOLDER in uri:
            run_id = self.source.info.run_id if self.source else None
            if not run_id:
                raise InputError(f"`data.{name}` uses {SOURCE_RUN_PLACEHOLDER} but the source model `{self.m.model}` has no run",
                                 hint="give the data's full URI")
            uri = uri.replace(SOURCE_RUN_PLACEHOLDER, run_id)
        if "://" not in uri and not uri.startswith(("runs:/", "models:/")):
            path = Path(uri)
            if not path.is_absolute() and self.loaded.path != "<manifest>":
                path = Path(self.loaded.path).resolve().parent / path
            uri = str(path)
        return uri

    def load_data(self, name: str) -> Dataset:
        if name in self._data:
            return self._data[name]
        if name not in DATA_SETS or getattr(self.m.data, name) is None:
            raise InputError(f"`data.{name}` is needed but not given in {self.loaded.path}",
                             hint=f"add `data: {{{name}: <URI>}}`")
        uri = self.data_uri(name)
        local = Path(uri)
        if "://" in uri or uri.startswith(("runs:/", "models:/")):
            import mlflow
            from mlflow.exceptions import MlflowException

            dst = self.workdir / "data" / name
            dst.mkdir(parents=True, exist_ok=True)
            try:
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
            except MlflowException as exc:
                raise InputError(f"`data.{name}`: cannot download `{redact(uri)}`: {str(exc).splitlines()[0]}",
                                 hint="check the run id and artifact path (the MLflow UI lists a run's artifacts)") from None
            except OSError as exc:
                raise InputError(f"`data.{name}`: cannot download `{redact(uri)}`: {exc}") from None
            if not local.resolve().is_relative_to(dst.resolve()):
                raise InputError(f"`data.{name}`: `{redact(uri)}` resolves outside its download folder")
        elif not local.exists():
            raise InputError(f"`data.{name}`: file `{uri}` does not exist", hint="check the path in the manifest")
        provided = self.registry.loader_for(local.suffix)
        if provided is None:
            known = sorted(s for p in self.registry.loaders.values() for s in p.cls.suffixes)
            raise InputError(f"`data.{name}`: no data loader reads `{local.suffix or local.name}` files (known: {', '.join(known)})",
                             hint="convert the data to .npz with arrays x and y, or install a plugin with a loader")
        dataset = provided.cls().load(local, source=f"data.{name}")
        dataset.check(needs_labels=name in ("evaluation", "training"))
        check_input_shape(f"data.{name}", dataset.x, self.source.input_shape)
        if name == "evaluation" and self.m.evaluation.max_samples:
            dataset = dataset.take(self.m.evaluation.max_samples)
        self._data[name] = dataset
        return dataset

    # -- measuring --------------------------------------------------------------------------
    def _evaluation_data(self) -> Dataset | None:
        return self.load_data("evaluation") if self.m.data.evaluation else None

    def measure(self, names: list[str], *, model_bytes: bytes | None, predict: Any = None) -> dict[str, float]:
        """Compute metrics for one model: predictions from `predict` when given, else from the .tflite."""
        ev_data = self._evaluation_data()
        threads = self.m.evaluation.threads or default_threads()
        batch = self.m.evaluation.batch_size
        flex = _flex_ops(model_bytes) if model_bytes is not None and predict is None else []
        if predict is None:
            from pipeline_stage.litert_runtime import TFLiteModel

            def predict(x):
                return TFLiteModel(model_bytes, threads=threads).predict(x.astype(np.float32), batch_size=batch)
        evaluation = Evaluation(model_bytes=model_bytes or b"", x=None if ev_data is None else ev_data.x,
                                labels=None if ev_data is None else ev_data.y, predict=predict,
                                latency_runs=self.m.evaluation.latency_runs)
        out: dict[str, float] = {}
        for name in names:
            provided = self.registry.metrics[name]
            metric = provided.cls()
            if metric.uses == "flatbuffer" and model_bytes is None:
                continue
            if flex and metric.runs_model:
                raise InputError(
                    f"metric `{name}` needs to run the model, but it contains TF Select ops ({', '.join(flex)}) "
                    "that the LiteRT interpreter cannot run",
                    hint="measure only what needs no interpreter (`evaluation: {metrics: [size_bytes], per_step: []}`) "
                         "and gate on that, or replace the ops")
            try:
                out[name] = float(metric.compute(evaluation))
            except StageError:
                raise
            except Exception as exc:
                raise PluginError(f"metric `{name}` (distribution `{provided.distribution}`) failed: {type(exc).__name__}: {exc}") from exc
        return out

    # -- the chain --------------------------------------------------------------------------
    def _apply(self, step: Step, index: int, subject: Any, ctx: StepContext) -> Any:
        try:
            return step.apply(subject, ctx)
        except StageError:
            raise
        except Exception as exc:
            dist = self.registry.steps[step.name].distribution
            raise PluginError(f"step {index + 1} `{step.name}` (distribution `{dist}`) failed: {type(exc).__name__}: {exc}") from exc

    def run(self) -> dict[str, Any]:
        from pipeline_stage import source as source_mod
        from pipeline_stage.registry import (
            TFLITE_ARTIFACT,
            StageRun,
            find_reusable,
            flatten,
            register_version,
            reuse_version,
        )

        options, m = self.options, self.m
        started = time.perf_counter()
        configure(options.tracking_uri)
        preflight(options.tracking_uri)
        own_tmp = None
        if options.workdir is None:
            own_tmp = tempfile.TemporaryDirectory(prefix="pipeline-stage-")
            self.workdir = Path(own_tmp.name)
        else:
            self.workdir = options.workdir
            self.workdir.mkdir(parents=True, exist_ok=True)
        context = RunContext(manifest=self.loaded, registry=self.registry, options=options,
                             workdir=self.workdir, quiet=options.quiet)
        self.context = context
        import mlflow

        client = mlflow.MlflowClient()
        info = source_mod.resolve(m.model, client)
        report: dict[str, Any] = {
            "passed": False,
            "manifest": {"path": self.loaded.path, "chain_digest": self.loaded.chain_digest,
                         "sha256": hashlib.sha256(self.loaded.text.encode()).hexdigest()},
            "source": dataclasses.asdict(info),
            "tracking_uri": redact(options.tracking_uri),
            "package_version": __version__,
        }
        context.report = report
        run = StageRun(m.experiment, tags={"pipeline_stage.chain_digest": self.loaded.chain_digest,
                                           "pipeline_stage.version": __version__, **{k: redact(v) for k, v in info.tags().items()}})
        context.run_id = report["run_id"] = run.run_id
        try:
            run.log_params(flatten({"manifest": {k: v for k, v in self.loaded.raw.items()}, "model": m.model}))
            run.log_text(self.loaded.text, "manifest.yaml")
            self.source = source_mod.load(info, self.workdir, safe_mode=not m.allow_unsafe_deserialization,
                                          custom_objects=self.registry.keras_objects)
            for name in sorted(self.loaded.required_data(self.registry) | {n for n in DATA_SETS if getattr(m.data, n)}):
                self.load_data(name)  # fail on bad data before any conversion work
            work_started = time.perf_counter()
            self._execute(report, run)
            report["timing"] = {"convert_and_evaluate_s": round(time.perf_counter() - work_started, 3)}
            report["seconds"] = round(time.perf_counter() - started, 3)
            tflite_path = self.workdir / "model.tflite"
            run.log_artifact(tflite_path, str(Path(TFLITE_ARTIFACT).parent))
            registered = None
            reg = m.registration
            if reg is not None and (report["passed"] or reg.on_failure == "register"):
                tags = self._version_tags(report)
                earlier = None
                if report["passed"] and not options.new_version:
                    keys = ("source.name", "source.version") if "source.version" in tags else ("source.uri", "source.run_id")
                    identity = {k: tags.get(k, "") for k in ("pipeline_stage.chain_digest", *keys)}
                    earlier = find_reusable(run.client, reg.name, identity)
                if earlier is not None:
                    registered = reuse_version(run.client, earlier, reg.alias)
                else:
                    ev = self._evaluation_data()
                    sample = ev.x[:4] if ev is not None else None
                    registered = register_version(run, name=reg.name, tflite_path=tflite_path, sample=sample,
                                                  tags=tags, alias=reg.alias if report["passed"] else None)
                self.hook.after_register(registered=registered, context=context)
            report["registered"] = registered
            run.set_tags({"pipeline_stage.passed": str(report["passed"]).lower()})
            self._write_reports(report, run)
            run.end("FINISHED")
        except BaseException as exc:
            report["error"] = redact(str(exc))
            try:
                self.hook.on_stage_error(error=exc, context=context)
            finally:
                self._write_local_report(report)
                run.end("FAILED" if not isinstance(exc, KeyboardInterrupt) else "KILLED")
            if isinstance(exc, StageError) or not isinstance(exc, Exception):
                raise
            if type(exc).__module__.startswith(("mlflow", "requests", "urllib3")):
                raise TrackingError(f"MLflow request failed: {redact(str(exc)).splitlines()[0][:300]}") from exc
            raise
        finally:
            if options.output_path is not None and (self.workdir / "model.tflite").exists():
                options.output_path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.workdir / "model.tflite", options.output_path)
            if own_tmp is not None:
                own_tmp.cleanup()
        if not report["passed"]:
            failed = [f"{g['metric']} {g['rule']} {g['threshold']} (value {g['value']:.6g})" for g in report["gates"] if not g["passed"]]
            raise GateFailed("gate failed: " + "; ".join(failed) + (
                f"; registered {registered['uri']} tagged failed, no alias" if registered else "; nothing registered"),
                report=report)
        return report

    def _execute(self, report: dict[str, Any], run) -> None:
        from pipeline_stage.flatbuffer import read as read_flatbuffer
        from pipeline_stage.gates import evaluate_gates

        m, src = self.m, self.source
        metric_names = self.loaded.metric_names()

        # Baseline: the source model for predictions, its float conversion for the flatbuffer metrics.
        t0 = time.perf_counter()
        ev = self._evaluation_data()
        self._progress("baseline")("float conversion, then " + (f"evaluation on {len(ev)} samples" if ev is not None else "measurements"))
        float_bytes = self._convert(ConversionSettings(allow_select_tf_ops=m.conversion.allow_select_tf_ops,
                                                       allow_custom_ops=m.conversion.allow_custom_ops),
                                    src.keras_model, log_name="convert-baseline.log")
        baseline_tflite = self.measure(metric_names, model_bytes=float_bytes)
        baseline = dict(baseline_tflite)
        baseline.update(self.measure(self._prediction_metrics(metric_names), model_bytes=None,
                                     predict=lambda x: src.predict(x, batch_size=m.evaluation.batch_size)))
        report["baseline"], report["baseline_tflite"] = baseline, baseline_tflite
        report["baseline_flatbuffer"] = read_flatbuffer(float_bytes).summary()
        report["baseline_seconds"] = round(time.perf_counter() - t0, 3)
        run.log_metrics({f"baseline.{k}": v for k, v in baseline.items()})

        if m.search is not None:
            from pipeline_stage.search import Search

            outcome = Search(self, report, run).run()
            model_bytes, records = outcome.model_bytes, outcome.records
            report["search"] = outcome.summary
            if outcome.conversion is not None:
                report["conversion"] = outcome.conversion
        else:
            model_bytes, records = self.run_chain(self.loaded.steps, report, run, float_bytes=float_bytes)
        (self.workdir / "model.tflite").write_bytes(model_bytes)
        report["steps"] = [r.to_dict() for r in records]
        self._progress("evaluate")(f"candidate: {', '.join(metric_names)}")
        candidate = self.measure(metric_names, model_bytes=model_bytes)
        report["candidate"] = candidate
        run.log_metrics(candidate)
        gates, passed = evaluate_gates(m.gates, candidate, baseline, self.higher_is_better(metric_names))
        report["gates"], report["passed"] = gates, passed
        self.hook.after_gates(results=gates, passed=passed, context=self.context)

    def higher_is_better(self, names: list[str]) -> dict[str, bool]:
        return {n: self.registry.metrics[n].cls.higher_is_better for n in names}

    def _convert(self, settings: ConversionSettings, keras_model: Any, *, log_name: str = "convert.log") -> bytes:
        from pipeline_stage.convert import convert

        representative = self.load_data(settings.representative_data) if settings.representative_data else None
        training = self.load_data(settings.training_data) if settings.training_data else None
        if representative is not None:
            self._progress("convert")(f"{settings.quantization} ({settings.engine}): calibrating on "
                                      f"{min(len(representative), settings.calibration_samples)} samples")
        return convert(self.source, settings, keras_model=keras_model, representative=representative, training=training,
                       log_path=self.workdir / log_name, log=self._progress("convert"))

    def run_chain(self, steps: list[Step], report: dict[str, Any], run, *,
                  float_bytes: bytes | None = None) -> tuple[bytes, list[StepRecord]]:
        """Run one chain on the source model: model steps, the one conversion, tflite steps.

        Returns the final .tflite bytes and a record per step. `float_bytes` (the baseline's float
        conversion) is reused when the chain asks nothing of the conversion.
        """
        from pipeline_stage.flatbuffer import read as read_flatbuffer

        m, context, src = self.m, self.context, self.source
        per_step = list(m.evaluation.per_step)
        settings = ConversionSettings(allow_select_tf_ops=m.conversion.allow_select_tf_ops,
                                      allow_custom_ops=m.conversion.allow_custom_ops)
        records: list[StepRecord] = []
        keras_model = src.keras_model
        model_bytes: bytes | None = None
        last_convert = max((i for i, s in enumerate(steps) if s.phase is Phase.CONVERT), default=None)

        def do_convert() -> bytes:
            t = time.perf_counter()
            transformed = any(s.phase is Phase.MODEL for s in steps)
            if float_bytes is not None and not transformed and settings.quantization is None and not settings.set_by:
                out = float_bytes  # nothing asked of the conversion: the baseline's is the same one
            else:
                out = self._convert(settings, keras_model)
                run.log_artifact(self.workdir / "convert.log")
            fb = read_flatbuffer(out)
            report["conversion"] = {"settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "set_by"},
                                    "seconds": round(time.perf_counter() - t, 3), "flatbuffer": fb.summary()}
            return out

        for i, step in enumerate(steps):
            if step.phase is Phase.TFLITE and model_bytes is None:
                model_bytes = do_convert()
            self.hook.before_step(step=step, index=i, context=context)
            ctx = StepContext(workdir=self.workdir, load_data=self.load_data, log=self._progress(step.name),
                              model=keras_model, conversion=settings)
            t = time.perf_counter()
            if step.phase is Phase.MODEL:
                if keras_model is None:
                    raise InputError(f"step `{step.name}` works on Keras models, but `{m.model}` is a SavedModel",
                                     hint="log the model as Keras (mlflow.tensorflow.log_model) or drop the step")
                keras_model = self._apply(step, i, keras_model, ctx)
                model_now = keras_model
                metrics = self.measure(self._prediction_metrics(per_step), model_bytes=None,
                                       predict=lambda x: np.asarray(first_output(
                                           model_now.predict(x, batch_size=m.evaluation.batch_size, verbose=0))))
            elif step.phase is Phase.CONVERT:
                self._apply(step, i, settings, ctx)
                metrics = {}
                if i == last_convert:
                    model_bytes = do_convert()
                    metrics = self.measure(per_step, model_bytes=model_bytes)
            else:
                model_bytes = self._apply(step, i, model_bytes, ctx)
                if not isinstance(model_bytes, (bytes, bytearray)):
                    raise PluginError(f"step `{step.name}` returned {type(model_bytes).__name__}, expected the .tflite bytes")
                model_bytes = bytes(model_bytes)
                metrics = self.measure(per_step, model_bytes=model_bytes)
            record = StepRecord(step.name, step.phase.value, step.params.model_dump(mode="json"), metrics,
                                time.perf_counter() - t, ctx.notes)
            records.append(record)
            self._step_tags.update(ctx.tags)
            for name, path in ctx.artifacts.items():
                run.log_artifact(Path(path), f"steps/{i}-{step.name}")
            run.log_metrics({f"step.{i}.{step.name}.{k}": v for k, v in metrics.items()})
            self.hook.after_step(step=step, record=record, context=context)
        if model_bytes is None:
            model_bytes = do_convert()
        return model_bytes, records

    def _progress(self, label: str):
        """Progress lines of long work (epochs, calibration, evaluation, trials) on stderr: one plain
        line per event, which is what Kubeflow's pod logs want; on a terminal the same lines with the
        label and verdicts coloured. `--quiet` silences them."""
        console = None
        if sys.stderr.isatty():
            from rich.console import Console

            console = Console(stderr=True, highlight=False, soft_wrap=True)

        def log(message: str) -> None:
            if self.options.quiet:
                return
            if console is not None:
                from rich.markup import escape

                text = escape(message)
                for word, colour in (("PASSED", "green"), ("FAILED", "red"), ("ERROR", "red")):
                    text = text.replace(word, f"[bold {colour}]{word}[/]")
                console.print(f"[cyan]\\[{escape(label)}][/] {text}")
            else:
                print(f"[{label}] {message}", file=sys.stderr, flush=True)
        return log

    def _prediction_metrics(self, names: list[str]) -> list[str]:
        return [n for n in names if self.registry.metrics[n].cls.uses == "predictions"]

    def _version_tags(self, report: dict[str, Any]) -> dict[str, str]:
        m = self.m
        tags: dict[str, Any] = {**self.source.info.tags(), "pipeline_stage.chain_digest": self.loaded.chain_digest,
                                "pipeline_stage.manifest_sha256": report["manifest"]["sha256"],
                                "pipeline_stage.version": __version__, "pipeline_stage.run_id": report["run_id"],
                                "pipeline_stage.passed": str(report["passed"]).lower(),
                                "pipeline_stage.chain": " -> ".join(s["name"] for s in report["steps"]) or "(none)",
                                "tflite_artifact": f"runs:/{report['run_id']}/tflite/model.tflite",
                                "pipeline_stage.priority": str(m.registration.priority)}
        if m.registration.alias:
            tags["pipeline_stage.alias"] = m.registration.alias
        for name, value in report["candidate"].items():
            tags[f"metric.{name}"] = value
        for name, value in report["baseline"].items():
            tags[f"baseline.{name}"] = value
        for g in report["gates"]:
            tags[f"gate.{g['metric']}.{g['rule']}"] = f"{'pass' if g['passed'] else 'fail'} (value {g['value']:.6g}, threshold {g['threshold']:g})"
        tags.update(self._step_tags)
        tags.update(m.registration.tags)
        from pipeline_stage.registry import tag_value

        return {k: tag_value(v) for k, v in tags.items()}

    @staticmethod
    def _rendered(report: dict[str, Any]) -> dict[str, str]:
        """report.md and report.html by suffix, once per run (the HTML's plots take a while); none
        for a run that ended before it had a candidate."""
        if "candidate" not in report:
            return {}
        from pipeline_stage.html_report import to_html

        return {".md": to_markdown(report), ".html": to_html(report)}

    def _write_local_report(self, report: dict[str, Any], rendered: dict[str, str] | None = None) -> None:
        from pipeline_stage.registry import write_json

        path = self.options.report_path
        if path is None:
            return
        write_json(path, report)
        for suffix, text in (self._rendered(report) if rendered is None else rendered).items():
            path.with_suffix(suffix).write_text(text)

    def _write_reports(self, report: dict[str, Any], run) -> None:
        import json

        run.log_text(json.dumps(report, indent=2, default=str), "report.json")
        rendered = self._rendered(report)
        for suffix, text in rendered.items():
            run.log_text(text, f"report{suffix}")
        self._write_local_report(report, rendered)


def _flex_ops(model_bytes: bytes) -> list[str]:
    from pipeline_stage.flatbuffer import read

    return sorted(op.split(":", 1)[1] for op in read(model_bytes).ops if op.startswith("CUSTOM:Flex"))


def run_stage(loaded: LoadedManifest, registry: Registry, options: RunOptions) -> dict[str, Any]:
    """Run a validated manifest; return the report (raises GateFailed when a gate failed)."""
    return Stage(loaded, registry, options).run()
