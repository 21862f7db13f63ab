"""Search trials in child processes: ``python -m pipeline_stage.run.trial FOLDER`` runs one;
``python -m pipeline_stage.run.trial --serve`` is a long-lived worker
(:mod:`pipeline_stage.run.workers`) that runs the trial folders it reads on stdin, one per line,
answering ``done`` on its original stdout, each trial's output going to FOLDER/trial.log.

The converter leaks memory on every call (tensorflow#122598), so trials run outside the stage's
process, and a worker is replaced after a bounded number of trials. FOLDER/trial.json holds a
complete manifest (the trial's chain, the parent's evaluation and conversion settings, local paths
for the source model and the data) and the metric names; the child runs the chain with the same chain runner as the stage (no MLflow) and
writes model.tflite and result.json: step records, measured metrics (a timed one, latency, timed
in alternating rounds beside the baseline's float .tflite), conversion summary and the tags its
steps set. Step artifacts land under FOLDER/artifacts for the parent to log.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any


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

    def log_text(self, text: str, path: str) -> None:
        dst = self.folder / "artifacts" / path
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(text)


def run_trial(folder: Path) -> dict[str, Any]:
    from pipeline_stage.contract.report import ObserverContext, SourceRef
    from pipeline_stage.engine.source_model import load_local
    from pipeline_stage.host.plugin_host import get_host
    from pipeline_stage.manifest import parse_manifest
    from pipeline_stage.run.chain import ChainRunner
    from pipeline_stage.run.progress import Progress

    spec = json.loads((folder / "trial.json").read_text())
    host = get_host()
    loaded = parse_manifest(spec["manifest"], host, path=f"<search trial {spec['index']}>")
    workdir = folder / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    source = load_local(
        Path(spec["source"]),
        SourceRef(uri=spec["source"]),
        safe_mode=not loaded.manifest.allow_unsafe_deserialization,
        custom_objects=host.keras_objects,
        signature=loaded.manifest.signature,
    )
    context = ObserverContext(
        manifest_path=loaded.path, chain_digest=loaded.chain_digest, steps=tuple(loaded.steps), run_id=None, quiet=True
    )
    runner = ChainRunner(loaded, host, source, workdir, progress=Progress(quiet=True), context=context)
    if spec.get("reference"):
        import numpy as np

        with np.load(spec["reference"]) as outputs:
            runner.use_reference({name: outputs[name] for name in outputs.files})
    result = runner.run_chain(loaded.steps, TrialLog(folder))
    (folder / "model.tflite").write_bytes(result.model_bytes)
    if spec.get("baseline"):  # latency: timed beside the baseline in this worker, as the stage times its candidate
        from pipeline_stage.run.measuring import measure_beside_baseline

        baseline_bytes = Path(spec["baseline"]).read_bytes()
        metrics, timed = measure_beside_baseline(
            runner, spec["metrics"], baseline_bytes=baseline_bytes, candidate_bytes=result.model_bytes
        )
    else:
        metrics, timed = runner.measure(spec["metrics"], model_bytes=result.model_bytes), []
    return {
        "metrics": metrics,
        "timed": [t.model_dump() for t in timed],
        "steps": [r.model_dump() for r in result.records],
        "conversion": result.conversion.model_dump() if result.conversion else None,
        "tags": result.tags,
    }


def main(folder: str) -> int:
    from pipeline_stage.contract.errors import StageError

    root = Path(folder)
    started = time.perf_counter()
    try:
        result = run_trial(root)
    except StageError as exc:  # a chain that does not work on this model: a finding, not a crash
        result = {"error": str(exc), "kind": type(exc).__name__}
    except Exception as exc:
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}", "kind": "crash"}
    result["seconds"] = round(time.perf_counter() - started, 3)
    (root / "result.json").write_text(json.dumps(result, default=str))
    return 0 if "error" not in result else 1


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
