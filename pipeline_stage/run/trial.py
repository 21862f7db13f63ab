"""Search trials in child processes: ``python -m pipeline_stage.run.trial FOLDER`` runs one;
``python -m pipeline_stage.run.trial --serve`` is a long-lived worker
(:mod:`pipeline_stage.run.workers`) that runs the trial folders it reads on stdin, one per line,
answering ``done`` on its original stdout, each trial's output going to FOLDER/trial.log.

The converter leaks memory on every call (tensorflow#122598), so trials run outside the stage's
process, and a worker is replaced after a bounded number of trials. FOLDER/request.json is a
:class:`~pipeline_stage.run.trial_protocol.TrialRequest`; the child runs its chain with the same
chain runner and measuring as the stage (no MLflow), its latency timed in alternating rounds
beside the baseline's float .tflite, and writes model.tflite and result.json (a
:class:`~pipeline_stage.run.trial_protocol.TrialResult`). Step artifacts land under
FOLDER/artifacts for the parent to log.
"""

from __future__ import annotations

import shutil
import sys
import time
import traceback
from pathlib import Path

from pipeline_stage.run.trial_protocol import MODEL, REQUEST, RESULT, TrialRequest, TrialResult


class TrialLog:
    """Where a trial's chain logs to: metrics in memory, artifacts copied under the trial folder
    (the parent logs both to the trial's nested MLflow run)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.metrics: dict[str, float] = {}

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.update(metrics)

    def log_artifact(self, local: Path, artifact_path: str | None = None) -> None:
        dst = self.folder / "artifacts" / (artifact_path or "")
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy(local, dst / Path(local).name)


def run_trial(folder: Path) -> TrialResult:
    """Run the trial that FOLDER/request.json asks for; write FOLDER/model.tflite."""
    from pipeline_stage.contract.report import ObserverContext, SourceRef
    from pipeline_stage.contract.sources import SourceOptions
    from pipeline_stage.engine.litert_runtime import use_op_registerers
    from pipeline_stage.engine.source_model import open_source
    from pipeline_stage.host.plugin_host import get_host
    from pipeline_stage.manifest import parse_steps
    from pipeline_stage.manifest.loaded import digest, digest_json
    from pipeline_stage.run.chain import ChainRunner
    from pipeline_stage.run.evaluation import EvaluationContext
    from pipeline_stage.run.measuring import measure
    from pipeline_stage.run.progress import Progress

    request = TrialRequest.model_validate_json((folder / REQUEST).read_text())
    host = get_host()
    where = f"<search trial {request.index}>"
    steps = parse_steps([{name: params} for name, params in request.chain], host, path=where, lines={}, loc=("chain",))
    workdir = folder / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    options = SourceOptions(
        allow_unsafe_deserialization=request.allow_unsafe_deserialization,
        custom_objects=host.keras_objects,
        signature=request.signature,
        io_layout=request.conversion.io_layout,
    )
    use_op_registerers(request.op_registerers)  # the stage's plugins', not only this process's installed ones
    source = open_source(Path(request.source), SourceRef(uri=request.source), host.source_classes, options, request.source_kind)
    evaluation = EvaluationContext(host, source, request.data, request.evaluation, workdir=workdir)
    if request.reference:
        from pipeline_stage.run.data_spool import load_outputs

        evaluation.use_reference(load_outputs(Path(request.reference)))
    context = ObserverContext(
        manifest_path=where,
        chain_digest=digest(digest_json(steps), request.signature, request.conversion.io_layout),
        steps=tuple(steps),
        run_id=None,
        quiet=True,
    )
    runner = ChainRunner(host, evaluation, request.conversion, workdir, progress=Progress(quiet=True), context=context)
    result = runner.run_chain(steps, TrialLog(folder))
    (folder / MODEL).write_bytes(result.model_bytes)
    beside = Path(request.baseline).read_bytes() if request.baseline else None
    measured = measure(host, evaluation, request.metrics, model_bytes=result.model_bytes, beside=beside)
    return TrialResult(
        metrics=measured.values,
        timed=measured.timed,
        steps=result.records,
        conversion=result.conversion,
        tags=result.tags,
        evaluation_notes=evaluation.notes,
        source_notes=source.notes,
    )


def main(folder: str) -> int:
    from pipeline_stage.contract.errors import StageError

    root = Path(folder)
    started = time.perf_counter()
    try:
        result = run_trial(root)
    except StageError as exc:  # a chain that does not work on this model: a finding, not a crash
        result = TrialResult(error=str(exc), kind=type(exc).__name__)
    except Exception as exc:
        traceback.print_exc()
        result = TrialResult(error=f"{type(exc).__name__}: {exc}", kind="crash")
    result.seconds = round(time.perf_counter() - started, 3)
    (root / RESULT).write_text(result.model_dump_json())
    return 0 if result.error is None else 1


def serve() -> int:
    """The worker loop: import what every trial needs once, then run trial folders from stdin."""
    import os

    from pipeline_stage.engine.tf_env import import_tf
    from pipeline_stage.host.plugin_host import get_host

    answers = os.fdopen(os.dup(1), "w")  # the protocol; fds 1 and 2 go to each trial's log
    import_tf()
    get_host()
    answers.write("ready\n")
    answers.flush()
    for line in sys.stdin:
        folder = Path(line.strip())
        sys.stdout.flush()
        sys.stderr.flush()
        with open(folder / "trial.log", "w") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            main(str(folder))
            sys.stdout.flush()
            sys.stderr.flush()
        answers.write("done\n")
        answers.flush()
    return 0


if __name__ == "__main__":
    sys.exit(serve() if sys.argv[1] == "--serve" else main(sys.argv[1]))
