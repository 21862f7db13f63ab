"""The stage: one execution of a manifest, from the MLflow run's start to its end.

It orchestrates; the work is elsewhere: the chain runner measures and runs chains, the search
proposes chains through plugins' moves, :mod:`pipeline_stage.mlflow_io` talks to MLflow and
:mod:`pipeline_stage.reporting` renders. A gate verdict is the returned report's ``passed``, not
an exception; exceptions are errors.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NoReturn

from pipeline_stage.contract.errors import InputError, StageError
from pipeline_stage.contract.gates import evaluate_gates
from pipeline_stage.contract.report import ManifestRef, ObserverContext, Report, SourceRef, Timing
from pipeline_stage.contract.sources import SourceOptions
from pipeline_stage.engine.litert_runtime import use_op_registerers
from pipeline_stage.engine.source_model import open_source
from pipeline_stage.host.plugin_host import PluginHost
from pipeline_stage.manifest import DATA_SETS, LoadedManifest
from pipeline_stage.mlflow_io import integrity
from pipeline_stage.mlflow_io import source as source_mod
from pipeline_stage.mlflow_io.failures import raise_classified
from pipeline_stage.mlflow_io.model_registry import TFLITE_ARTIFACT, check_may_register, publish, version_tags
from pipeline_stage.mlflow_io.object_store import probe_all
from pipeline_stage.mlflow_io.registry_rules import PASSED_TAG
from pipeline_stage.mlflow_io.stage_run import StageRun, flatten
from pipeline_stage.mlflow_io.tracking import client as tracking_client
from pipeline_stage.mlflow_io.tracking import configure, preflight, redact
from pipeline_stage.reporting.files import render, write_json
from pipeline_stage.reporting.html import render_plots
from pipeline_stage.run.chain import ChainRunner
from pipeline_stage.run.compiling import Measuring, check_available, compile_targets
from pipeline_stage.run.evaluation import SOURCE_RUN_PLACEHOLDER, EvaluationContext
from pipeline_stage.run.measuring import measure
from pipeline_stage.run.phase_clock import PhaseClock, peak_rss_mb, process_age_s
from pipeline_stage.run.progress import Progress
from pipeline_stage.run.workers import TrialWorkers, start_workers
from pipeline_stage.version import __version__


@dataclass
class RunOptions:
    tracking_uri: str
    report_path: Path | None = None
    output_path: Path | None = None  # copy of the final .tflite (Kubeflow's Output[Model])
    compiled_dir: Path | None = None  # copies of the compiled models, <compiler>_<soc>.tflite (Kubeflow's Output[Artifact])
    workdir: Path | None = None  # kept when given; a temporary folder otherwise
    quiet: bool = False
    new_version: bool = False  # register even if an identical passing version exists
    # The start-up before the run (interpreter, imports, CLI): by default this process's age when
    # the run starts (a process that does only this run); a caller that did other work first (the
    # demo trains a model) gives what it measured before that work, or None for unknown.
    startup_s: float | None | Literal["process"] = "process"


class Stage:
    """One execution of a manifest (see the module docstring): :meth:`run` goes through its phases,
    each a method: open (tracking, the source, the permission), start (the report and the MLflow
    run), load (the model, the data, the chain runner), execute (baseline, chain or search,
    candidate, gates), finish (registration, reports), and fail or close."""

    def __init__(self, loaded: LoadedManifest, host: PluginHost, options: RunOptions):
        self.loaded, self.m, self.host, self.options = loaded, loaded.manifest, host, options
        self.progress = Progress(options.quiet)
        self.clock = PhaseClock()
        self.started = time.perf_counter()
        self.startup: float | None = None
        self.own_tmp = tempfile.TemporaryDirectory(prefix="pipeline-stage-") if options.workdir is None else None
        self.workdir = Path(self.own_tmp.name) if self.own_tmp is not None else options.workdir
        self.manifest_sha256 = hashlib.sha256(loaded.text.encode()).hexdigest()
        self.client = None  # MlflowClient, once tracking is configured
        self.report: Report | None = None
        self.workers: TrialWorkers | None = None
        self.convert_and_evaluate: float | None = None  # from the baseline's conversion to the gates
        self.compiled_files: dict[str, Path] = {}  # compiled models by target key, registered beside the .tflite

    def run(self) -> Report:
        """Run the manifest; return the report (``report.passed`` says whether every gate passed)."""
        self.started = time.perf_counter()
        self.startup = process_age_s() if self.options.startup_s == "process" else self.options.startup_s
        info, files = self._open()
        run, context = self._start(info)
        try:
            runner = self._load(info, files, run, context)
            step_tags = self._execute(run, runner, context)
            self._finish(run, runner, step_tags, context)
        except BaseException as exc:
            self._fail(exc, run, context)
        finally:
            self._close()
        return self.report

    def _open(self) -> tuple[SourceRef, str]:
        """Tracking configured and reachable, the work folder, the source resolved to where its
        files are, and the permission to register checked: before any MLflow run exists."""
        configure(self.options.tracking_uri)
        preflight(self.options.tracking_uri)
        self.client = tracking_client()
        self.workdir.mkdir(parents=True, exist_ok=True)
        info = source_mod.resolve(self.m.model, self.client)
        files = source_mod.files_uri(info, self.client)
        self._check_kind_available(info, files)
        check_available(self.loaded.compile_targets)
        if self.m.registration is not None:
            check_may_register(self.client, self.m.registration.name)
        return info, files

    def _check_kind_available(self, info: SourceRef, files: str) -> None:
        """A model of a kind this install cannot open (its framework missing) stops the stage now,
        before the download and the run: by the URI's suffix, else by the MLmodel file alone."""
        classes = self.host.source_classes
        missing = {name: why for name, cls in classes.items() if (why := cls.unavailable())}
        if not missing:
            return
        kind, flavors = self.host.source_kind_of(info.uri), []
        if kind is None:
            flavors = source_mod.model_flavors(info.uri, self.workdir / "source-mlmodel", files)
            kind = next((name for name, cls in classes.items() if set(cls.flavors) & set(flavors)), None)
        if kind in missing:
            cls = classes[kind]
            flavor = ", ".join(f for f in flavors if f in cls.flavors)
            raise InputError(
                f"model `{redact(info.uri)}` is {cls.title or kind}"
                + (f" (MLflow flavor `{flavor}`)" if flavor else "")
                + f": {missing[kind]}",
                hint=cls.install_hint or "install the source plugin's dependencies",
            )

    def _start(self, info: SourceRef) -> tuple[StageRun, ObserverContext]:
        """The report, the MLflow run (tagged with the chain and the source), the observers'
        context, and a search's worker processes (their imports overlap the downloads)."""
        self.report = Report(
            manifest=ManifestRef(path=self.loaded.path, chain_digest=self.loaded.chain_digest, sha256=self.manifest_sha256),
            source=info,
            tracking_uri=redact(self.options.tracking_uri),
            package_version=__version__,
        )
        run = StageRun(self.m.experiment, tags={**self._identity(info), "pipeline_stage.version": __version__})
        self.report.run_id = run.run_id
        self.clock.add("resolve", time.perf_counter() - self.started)
        context = ObserverContext(
            manifest_path=self.loaded.path,
            chain_digest=self.loaded.chain_digest,
            steps=tuple(self.loaded.steps),
            run_id=run.run_id,
            quiet=self.options.quiet,
            progress=self.progress,
        )
        self.workers = start_workers(self.m.search) if self.m.search is not None else None
        return run, context

    def _identity(self, info: SourceRef) -> dict[str, str]:
        """The tags that make two runs the same stage: the chain digest and the source."""
        return {"pipeline_stage.chain_digest": self.loaded.chain_digest, **{k: redact(v) for k, v in info.tags().items()}}

    def _load(self, info: SourceRef, files: str, run: StageRun, context: ObserverContext) -> ChainRunner:
        """The stores probed, runs an outage left RUNNING ended, the manifest logged, the model
        downloaded and opened by its source plugin, the data loaded: the chain runner on them."""
        report, m = self.report, self.m
        probe_all(self._store_places(info, files, run.run.info.artifact_uri))
        # Runs of this chain on this source that an outage left RUNNING end now, FAILED, saying why.
        report.ended_orphans = run.end_orphans(self._identity(info))
        if report.ended_orphans:
            self.progress("tracking")(f"ended {len(report.ended_orphans)} run(s) an outage left RUNNING")
        run.log_params(flatten({"manifest": dict(self.loaded.raw), "model": m.model}))
        run.log_text(self.loaded.text, "manifest.yaml")
        with self.clock.phase("model_download"):
            root = source_mod.download(info.uri, self.workdir / "source-model", files=files)
        with self.clock.phase("load"):
            options = SourceOptions(
                allow_unsafe_deserialization=m.allow_unsafe_deserialization,
                custom_objects=self.host.keras_objects,
                signature=m.signature,
                io_layout=m.conversion.io_layout,
            )
            use_op_registerers(self.host.op_registerers())
            source = open_source(root, info, self.host.source_classes, options)
            report.source = info.model_copy(update={"kind": source.name})
            evaluation = EvaluationContext.for_manifest(self.loaded, self.host, source, self.workdir, log=self.progress("data"))
            runner = ChainRunner(self.host, evaluation, m.conversion, self.workdir, progress=self.progress, context=context)
            runner.check_chain(self.loaded.steps, search=m.search is not None)
            evaluation.load_all(self.loaded.required_data(self.host))
            run.log_datasets([{**d, "uri": redact(d["uri"])} for d in evaluation.lineage()])
        return runner

    def _finish(self, run: StageRun, runner: ChainRunner, step_tags: dict[str, str], context: ObserverContext) -> None:
        """The version registered (the plots render meanwhile), the timing, the reports, the run ended."""
        report = self.report
        report.seconds = round(time.perf_counter() - self.started, 3)
        # The plots need the measurements only: rendered while the version registers, which
        # mostly waits on the server (the GIL is free then).
        pool = ThreadPoolExecutor(1, thread_name_prefix="plots")
        plots = pool.submit(render_plots, report)
        pool.shutdown(wait=False)  # the thread ends with its one task
        with self.clock.phase("register"):
            self._register(run, runner, step_tags, context)
            run.set_tags({PASSED_TAG: str(report.passed).lower()})
        timing = {"startup_s": round(self.startup, 3)} if self.startup is not None else {}
        report.timing = Timing(convert_and_evaluate_s=self.convert_and_evaluate, **timing, **self.clock.fields())
        self._write_reports(run, plots)
        run.end("FINISHED")

    def _fail(self, exc: BaseException, run: StageRun, context: ObserverContext) -> NoReturn:
        """The error in the report, observers told, the local report written, the run ended
        FAILED (KILLED on an interrupt); the error raised again, classified when MLflow's."""
        self.report.error = redact(str(exc))
        try:
            self.host.hook.on_stage_error(error=exc, context=context)
        finally:
            self._write_local_report()
            run.end("FAILED" if not isinstance(exc, KeyboardInterrupt) else "KILLED")
        if isinstance(exc, StageError) or not isinstance(exc, Exception):
            raise exc
        raise_classified(exc, "talking to MLflow")  # unchanged unless it comes from the server
        raise exc

    def _close(self) -> None:
        """Workers stopped, the .tflite (and compiled models) copied where Kubeflow wants them, the work
        folder removed (if ours)."""
        if self.workers is not None:
            self.workers.close()
        output = self.options.output_path
        if output is not None and (self.workdir / "model.tflite").exists():
            output.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.workdir / "model.tflite", output)
        if self.options.compiled_dir is not None and self.compiled_files:
            self.options.compiled_dir.mkdir(parents=True, exist_ok=True)
            for path in self.compiled_files.values():
                shutil.copyfile(path, self.options.compiled_dir / path.name)
        if self.own_tmp is not None:
            self.own_tmp.cleanup()

    def _store_places(self, source: SourceRef, files: str, run_artifacts: str) -> dict[str, str]:
        """Where the run reads and writes files: the source's `files`, the run's artifact root, data given by URI."""
        places = {f"the source model `{redact(source.uri)}`": files, "the stage run's artifact root": run_artifacts}
        for name in DATA_SETS:
            uri = self.m.data.uri(name) or ""
            if source.run_id:
                uri = uri.replace(SOURCE_RUN_PLACEHOLDER, source.run_id)
            if SOURCE_RUN_PLACEHOLDER not in uri and source_mod.is_remote(uri):
                places[f"`data.{name}`"] = uri
        return places

    def _execute(self, run: StageRun, runner: ChainRunner, context: ObserverContext) -> dict[str, str]:
        """Baseline, the chain (or the search), the candidate's measurements and the gates; returns
        the tags the chain's steps ask for on the registered version."""
        report, ev = self.report, runner.evaluation
        work_started = time.perf_counter()
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
            runner.source.notes.extend(n for n in outcome.source_notes if n not in runner.source.notes)
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
        if self.loaded.compile_targets:
            self._compile(run, runner, result.model_bytes, names)
        report.evaluation_notes = list(ev.notes)
        report.source_notes = list(runner.source.notes)
        self.host.hook.after_gates(results=list(report.gates), passed=report.passed, context=context)
        self.convert_and_evaluate = round(time.perf_counter() - work_started, 3)
        return tags

    def _compile(self, run: StageRun, runner: ChainRunner, model_bytes: bytes, names: list[str]) -> None:
        """The portable model compiled per accelerator target; those that run here measured and gated."""
        report = self.report
        measuring = None
        if self.m.compile.evaluate:
            measuring = Measuring(self.host, runner.evaluation, names, self.m.gates, report.compared_baseline())
        with self.clock.phase("compile"):
            report.compiled, self.compiled_files = compile_targets(
                self.loaded.compile_targets, model_bytes, self.workdir, measuring=measuring, log=self.progress("compile")
            )
        report.passed = report.passed and all(g.passed for c in report.compiled for g in c.gates)
        for c in report.compiled:
            run.log_metrics({f"compiled.{c.key}.{k}": v for k, v in c.metrics.items()})
            if c.partition:
                run.log_metrics({f"compiled.{c.key}.ops_offloaded": c.partition["share"]})

    def _register(self, run: StageRun, runner: ChainRunner, step_tags: dict[str, str], context: ObserverContext) -> None:
        """The .tflite logged to the run; registered as a version (or an identical one reused) when
        the gates passed or the manifest registers failures too; the digests recorded."""
        report = self.report
        tflite_path = self.workdir / "model.tflite"
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
            tags=version_tags(report, reg, step_tags, self.manifest_sha256),
            tflite_path=tflite_path,
            attachments=self.compiled_files,
            sample=_head(runner.evaluation.inputs_of(ev), 4) if ev is not None else None,
            new_version=self.options.new_version,
        )
        run.set_tags(integrity.as_tags(report.artifacts))  # what `verify runs:/...` and a registry owner read
        self.host.hook.after_register(registered=report.registered, context=context)

    def _write_local_report(self, rendered: dict[str, str] | None = None) -> None:
        report, path = self.report, self.options.report_path
        if path is None:
            return
        write_json(path, report.to_json_data())
        for suffix, text in (render(report) if rendered is None else rendered).items():
            path.with_suffix(suffix).write_text(text)

    def _write_reports(self, run: StageRun, plots: Future) -> None:
        """report.md / .html, then report.json, which alone holds the time these took (the wait for
        the plots included) and the total."""
        report = self.report
        started = time.perf_counter()
        rendered = render(report, plots.result())
        for suffix, text in rendered.items():
            run.log_text(text, f"report{suffix}")
        report.timing = report.timing.model_copy(
            update={
                "reports_s": round(time.perf_counter() - started, 3),
                "total_s": round((self.startup or 0.0) + time.perf_counter() - self.started, 3),
                "peak_rss_mb": peak_rss_mb(),
            }
        )
        run.log_text(json.dumps(report.to_json_data(), indent=2, default=str), "report.json")
        self._write_local_report(rendered)


def _head(inputs, n: int):
    """The first `n` samples of an input array, or of each input array by name."""
    return {k: v[:n] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[:n]


def run_stage(loaded: LoadedManifest, host: PluginHost, options: RunOptions) -> Report:
    """Run a validated manifest; return its report (``report.passed``: every gate passed)."""
    return Stage(loaded, host, options).run()
