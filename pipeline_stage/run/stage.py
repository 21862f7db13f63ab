"""The stage: one execution of a manifest, from the MLflow run's start to its end.

It orchestrates; the work is elsewhere: the chain runner measures and runs chains, the search
proposes chains through plugins' moves, :mod:`pipeline_stage.mlflow_io` talks to MLflow and
:mod:`pipeline_stage.reporting` renders. A gate verdict is the returned report's ``passed``, not
an exception; exceptions are errors.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline_stage.contract.errors import StageError
from pipeline_stage.contract.gates import evaluate_gates
from pipeline_stage.contract.report import ManifestRef, ObserverContext, Report, SourceRef, Timing
from pipeline_stage.host.plugin_host import PluginHost
from pipeline_stage.manifest import DATA_SETS, LoadedManifest
from pipeline_stage.mlflow_io.failures import raise_classified
from pipeline_stage.mlflow_io.model_registry import check_may_register
from pipeline_stage.mlflow_io.object_store import probe_all
from pipeline_stage.mlflow_io.registry_rules import PASSED_TAG
from pipeline_stage.mlflow_io.source import is_remote
from pipeline_stage.mlflow_io.tracking import configure, preflight, redact
from pipeline_stage.reporting.html import render_plots
from pipeline_stage.run.chain import ChainRunner
from pipeline_stage.run.evaluation import SOURCE_RUN_PLACEHOLDER, EvaluationContext
from pipeline_stage.run.measuring import measure
from pipeline_stage.run.phase_clock import PhaseClock, peak_rss_mb, process_age_s
from pipeline_stage.run.progress import Progress
from pipeline_stage.run.workers import start_workers
from pipeline_stage.version import __version__


@dataclass
class RunOptions:
    tracking_uri: str
    report_path: Path | None = None
    output_path: Path | None = None  # copy of the final .tflite (Kubeflow's Output[Model])
    workdir: Path | None = None  # kept when given; a temporary folder otherwise
    quiet: bool = False
    new_version: bool = False  # register even if an identical passing version exists
    # The start-up before the run (interpreter, imports, CLI): by default this process's age when
    # the run starts (a process that does only this run); a caller that did other work first (the
    # demo trains a model) gives what it measured before that work, or None for unknown.
    startup_s: float | None | Literal["process"] = "process"


class Stage:
    """One execution of a manifest (see the module docstring)."""

    def __init__(self, loaded: LoadedManifest, host: PluginHost, options: RunOptions):
        self.loaded, self.m, self.host, self.options = loaded, loaded.manifest, host, options
        self.progress = Progress(options.quiet)

    def run(self) -> Report:
        """Run the manifest; return the report (``report.passed`` says whether every gate passed)."""
        from pipeline_stage.engine.source_model import load_local
        from pipeline_stage.mlflow_io import source as source_mod
        from pipeline_stage.mlflow_io.stage_run import StageRun, flatten

        options, m = self.options, self.m
        started = self.started = time.perf_counter()
        clock = self.clock = PhaseClock()
        startup = process_age_s() if options.startup_s == "process" else options.startup_s
        configure(options.tracking_uri)
        preflight(options.tracking_uri)
        own_tmp = tempfile.TemporaryDirectory(prefix="pipeline-stage-") if options.workdir is None else None
        workdir = Path(own_tmp.name) if own_tmp is not None else options.workdir
        workdir.mkdir(parents=True, exist_ok=True)
        import mlflow

        info = source_mod.resolve(m.model, mlflow.MlflowClient())
        files = source_mod.files_uri(info, mlflow.MlflowClient())
        if m.registration is not None:
            check_may_register(mlflow.MlflowClient(), m.registration.name)
        sha256 = hashlib.sha256(self.loaded.text.encode()).hexdigest()
        report = Report(
            manifest=ManifestRef(path=self.loaded.path, chain_digest=self.loaded.chain_digest, sha256=sha256),
            source=info,
            tracking_uri=redact(options.tracking_uri),
            package_version=__version__,
        )
        identity = {"pipeline_stage.chain_digest": self.loaded.chain_digest, **{k: redact(v) for k, v in info.tags().items()}}
        run = StageRun(m.experiment, tags={**identity, "pipeline_stage.version": __version__})
        report.run_id = run.run_id
        clock.add("resolve", time.perf_counter() - started)
        context = ObserverContext(
            manifest_path=self.loaded.path,
            chain_digest=self.loaded.chain_digest,
            steps=tuple(self.loaded.steps),
            run_id=run.run_id,
            quiet=options.quiet,
            progress=self.progress,
        )
        # A search's worker processes start now: their TensorFlow imports overlap with the downloads
        # and the baseline.
        self.workers = start_workers(m.search) if m.search is not None else None
        try:
            probe_all(self._store_places(info, files, run.run.info.artifact_uri))
            # Runs of this chain on this source that an outage left RUNNING end now, FAILED, saying why.
            report.ended_orphans = run.end_orphans(identity)
            if report.ended_orphans:
                self.progress("tracking")(f"ended {len(report.ended_orphans)} run(s) an outage left RUNNING")
            run.log_params(flatten({"manifest": dict(self.loaded.raw), "model": m.model}))
            run.log_text(self.loaded.text, "manifest.yaml")
            with clock.phase("model_download"):
                root = source_mod.download(info.uri, workdir / "source-model", files=files)
            with clock.phase("load"):
                source = load_local(
                    root,
                    info,
                    safe_mode=not m.allow_unsafe_deserialization,
                    custom_objects=self.host.keras_objects,
                    signature=m.signature,
                )
                evaluation = EvaluationContext.for_manifest(self.loaded, self.host, source, workdir, log=self.progress("data"))
                runner = ChainRunner(self.host, evaluation, m.conversion, workdir, progress=self.progress, context=context)
                runner.check_chain(self.loaded.steps, search=m.search is not None)
                evaluation.load_all(self.loaded.required_data(self.host))
                run.log_datasets([{**d, "uri": redact(d["uri"])} for d in evaluation.lineage()])
            work_started = time.perf_counter()
            step_tags = self._execute(report, run, runner, context)
            convert_and_evaluate = round(time.perf_counter() - work_started, 3)
            report.seconds = round(time.perf_counter() - started, 3)
            # The plots need the measurements only: rendered while the version registers, which
            # mostly waits on the server (the GIL is free then).
            pool = ThreadPoolExecutor(1, thread_name_prefix="plots")
            plots = pool.submit(render_plots, report)
            pool.shutdown(wait=False)  # the thread ends with its one task
            with clock.phase("register"):
                self._register(report, run, runner, workdir, step_tags, sha256, context)
                run.set_tags({PASSED_TAG: str(report.passed).lower()})
            timing = {"startup_s": round(startup, 3)} if startup is not None else {}
            report.timing = Timing(convert_and_evaluate_s=convert_and_evaluate, **timing, **clock.fields())
            self._write_reports(report, run, startup, plots)
            run.end("FINISHED")
        except BaseException as exc:
            report.error = redact(str(exc))
            try:
                self.host.hook.on_stage_error(error=exc, context=context)
            finally:
                self._write_local_report(report)
                run.end("FAILED" if not isinstance(exc, KeyboardInterrupt) else "KILLED")
            if isinstance(exc, StageError) or not isinstance(exc, Exception):
                raise
            raise_classified(exc, "talking to MLflow")  # unchanged unless it comes from the server
        finally:
            if self.workers is not None:
                self.workers.close()
            if options.output_path is not None and (workdir / "model.tflite").exists():
                options.output_path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(workdir / "model.tflite", options.output_path)
            if own_tmp is not None:
                own_tmp.cleanup()
        return report

    def _store_places(self, source: SourceRef, files: str, run_artifacts: str) -> dict[str, str]:
        """Where the run reads and writes files: the source's `files`, the run's artifact root, data given by URI."""
        places = {f"the source model `{redact(source.uri)}`": files, "the stage run's artifact root": run_artifacts}
        for name in DATA_SETS:
            uri = self.m.data.uri(name) or ""
            if source.run_id:
                uri = uri.replace(SOURCE_RUN_PLACEHOLDER, source.run_id)
            if SOURCE_RUN_PLACEHOLDER not in uri and is_remote(uri):
                places[f"`data.{name}`"] = uri
        return places

    def _execute(self, report: Report, run, runner: ChainRunner, context: ObserverContext) -> dict[str, str]:
        """Baseline, the chain (or the search), the candidate's measurements and the gates; returns
        the tags the chain's steps ask for on the registered version."""
        ev = runner.evaluation
        names = self.loaded.metric_names(labels=ev.has_labels)
        with self.clock.phase("baseline"):
            baseline = runner.baseline(names)
        report.baseline, report.baseline_tflite = baseline.metrics, baseline.tflite_metrics
        report.baseline_flatbuffer, report.baseline_seconds = baseline.flatbuffer, baseline.seconds
        run.log_metrics({f"baseline.{k}": v for k, v in baseline.metrics.items()})
        if self.m.search is not None:
            run.flush()  # a search takes a while: the run page shows the baseline meanwhile
            from pipeline_stage.run.search import Search

            with self.clock.phase("chain"):
                outcome = Search(self.loaded, runner, baseline, names, run, self.workers).run()
            result, report.search = outcome.result, outcome.summary
            tags = {**result.tags, "pipeline_stage.search.trial": str(outcome.chosen)}
        else:
            with self.clock.phase("chain"):
                result = runner.run_chain(self.loaded.steps, run, float_bytes=baseline.float_bytes)
            tags = dict(result.tags)
        if result.conversion is not None:
            report.conversion = result.conversion
        (runner.workdir / "model.tflite").write_bytes(result.model_bytes)
        report.steps = result.records
        self.progress("evaluate")(f"candidate: {', '.join(names)}")
        with self.clock.phase("evaluate"):
            # latency: baseline and candidate timed side by side now, not minutes apart
            measured = measure(self.host, ev, names, model_bytes=result.model_bytes, beside=baseline.float_bytes)
            report.candidate, report.timed = measured.values, measured.timed
            report.gates, report.passed = evaluate_gates(
                self.m.gates,
                report.candidate,
                report.compared_baseline(),
                runner.higher_is_better(names),
                tolerance={t.metric: t.spread for t in report.timed},
            )
        run.log_metrics(report.candidate)
        run.log_metrics({f"baseline.{t.metric}": t.baseline for t in report.timed})
        report.evaluation_notes = list(ev.notes)
        self.host.hook.after_gates(results=list(report.gates), passed=report.passed, context=context)
        return tags

    def _register(
        self,
        report: Report,
        run,
        runner: ChainRunner,
        workdir: Path,
        step_tags: dict[str, str],
        sha256: str,
        context: ObserverContext,
    ) -> None:
        from pipeline_stage.mlflow_io import integrity
        from pipeline_stage.mlflow_io.model_registry import TFLITE_ARTIFACT, publish, version_tags

        tflite_path = workdir / "model.tflite"
        run.log_artifact(tflite_path, str(Path(TFLITE_ARTIFACT).parent))
        report.artifacts = [integrity.digest_file(tflite_path, f"{integrity.RUN}/{TFLITE_ARTIFACT}")]
        reg = self.m.registration
        if reg is None or not (report.passed or reg.on_failure == "register"):
            report.registered = None
            run.set_tags(integrity.as_tags(report.artifacts))
            return
        ev = runner.evaluation.evaluation
        report.registered = publish(
            run,
            report,
            reg,
            tags=version_tags(report, reg, step_tags, sha256),
            tflite_path=tflite_path,
            sample=_head(runner.evaluation.inputs_of(ev), 4) if ev is not None else None,
            new_version=self.options.new_version,
        )
        run.set_tags(integrity.as_tags(report.artifacts))  # what `verify runs:/...` and a registry owner read
        self.host.hook.after_register(registered=report.registered, context=context)

    def _write_local_report(self, report: Report, rendered: dict[str, str] | None = None) -> None:
        from pipeline_stage.reporting.files import render, write_json

        path = self.options.report_path
        if path is None:
            return
        write_json(path, report.to_json_data())
        for suffix, text in (render(report) if rendered is None else rendered).items():
            path.with_suffix(suffix).write_text(text)

    def _write_reports(self, report: Report, run, startup: float | None, plots: Future) -> None:
        """report.md / .html, then report.json, which alone holds the time these took (the wait for
        the plots included) and the total."""
        import json

        from pipeline_stage.reporting.files import render

        started = time.perf_counter()
        rendered = render(report, plots.result())
        for suffix, text in rendered.items():
            run.log_text(text, f"report{suffix}")
        report.timing = report.timing.model_copy(
            update={
                "reports_s": round(time.perf_counter() - started, 3),
                "total_s": round((startup or 0.0) + time.perf_counter() - self.started, 3),
                "peak_rss_mb": peak_rss_mb(),
            }
        )
        run.log_text(json.dumps(report.to_json_data(), indent=2, default=str), "report.json")
        self._write_local_report(report, rendered)


def _head(inputs, n: int):
    """The first `n` samples of an input array, or of each input array by name."""
    return {k: v[:n] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[:n]


def run_stage(loaded: LoadedManifest, host: PluginHost, options: RunOptions) -> Report:
    """Run a validated manifest; return its report (``report.passed``: every gate passed)."""
    return Stage(loaded, host, options).run()
