"""The stage's MLflow run: params, metrics, artifacts, nested trial runs, and ending it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_stage.mlflow_io.failures import CleanupClock, raise_classified, retrying
from pipeline_stage.mlflow_io.tracking import redact


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Flatten nested manifest data into MLflow params (`chain.0.quantize.mode: int8`)."""
    out: dict[str, str] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, list):
        if not value:
            out[prefix] = "[]"
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}.{i}" if prefix else str(i)))
    else:
        out[prefix] = param_value(value)
    return out


def param_value(value: Any) -> str:
    """An MLflow param value: credentials redacted, cut to 6,000 characters (MLflow's limit)."""
    return redact(str(value))[:6000]


def tag_value(value: Any) -> str:
    """A registered version's tag value: floats to 6 significant digits, credentials redacted, and
    cut to 5,000 characters (under MLflow 3's limits: 8,000 for run tags, 100,000 for version tags,
    and short enough to read in the UI)."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return redact(str(value))[:5000]


ORPHAN_REASON = (
    "left RUNNING: the tracking server was unreachable when its stage ended; ended by a later run of the same chain "
    "on the same source"
)


class StageRun:
    """The MLflow run of one stage execution; ends FAILED unless `end("FINISHED")` is reached.

    Every call classifies what MLflow raises (:mod:`pipeline_stage.mlflow_io.failures`), naming
    what was being logged; the cleanup calls share one :class:`CleanupClock`."""

    def __init__(self, experiment: str, run_name: str | None = None, tags: dict[str, str] | None = None):
        import mlflow

        self.mlflow = mlflow
        self.client = mlflow.MlflowClient()
        self.cleanup = CleanupClock()
        try:
            mlflow.set_experiment(experiment)
            self.run = mlflow.start_run(run_name=run_name, tags=tags)
        except Exception as exc:
            raise_classified(exc, f"starting a run in experiment `{experiment}`")
        self.run_id = self.run.info.run_id

    def _call(self, doing: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise_classified(exc, f"{doing} (run {self.run_id})")

    def log_params(self, params: dict[str, str]) -> None:
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._call("logging params", self.mlflow.log_params, dict(items[i : i + 100]))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
        if clean:
            self._call("logging metrics", self.mlflow.log_metrics, clean, step=step)

    def log_text(self, text: str, path: str) -> None:
        self._call(f"logging {path}", self.mlflow.log_text, text, path)

    def log_artifact(self, local: Path, artifact_path: str | None = None) -> None:
        self._call(f"uploading {local.name}", self.mlflow.log_artifact, str(local), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._call("setting tags", self.mlflow.set_tags, tags)

    def end_orphans(self, match: dict[str, str]) -> list[str]:
        """End FAILED the runs that an outage left RUNNING with the same `match` tags (the chain
        digest and the source), and their trial runs, with a tag saying why; returns their ids.

        A run of the same chain that is in fact still going (two identical steps at once) is set
        FINISHED again by its own end, which also drops the tag."""
        running = self._call(
            "looking for runs left RUNNING",
            self.client.search_runs,
            [self.run.info.experiment_id],
            filter_string="attributes.status = 'RUNNING'",
            max_results=1000,
        )
        orphans = {
            r.info.run_id
            for r in running
            if r.info.run_id != self.run_id and all(r.data.tags.get(k) == v for k, v in match.items())
        }
        ended = [r.info.run_id for r in running if r.info.run_id in orphans or r.data.tags.get("mlflow.parentRunId") in orphans]
        for run_id in ended:
            for key, value in (("pipeline_stage.ended_by", self.run_id), ("pipeline_stage.end_reason", ORPHAN_REASON)):
                self._call("ending a run left RUNNING", self.client.set_tag, run_id, key, value)
            self._call("ending a run left RUNNING", self.client.set_terminated, run_id, "FAILED")
        return ended

    def child_run(
        self,
        name: str,
        *,
        params: dict[str, str],
        metrics: dict[str, float],
        tags: dict[str, str],
        artifacts: list[Path],
        failed: bool = False,
    ) -> str:
        """A finished nested run under this one (a search trial); returns its id. Tag and param values
        are bounded here, as MLflow requires (tag_value, param_value)."""
        from mlflow.entities import Metric, Param, RunTag

        try:
            experiment_id = self.run.info.experiment_id
            tags = {k: tag_value(v) for k, v in tags.items()}
            child = retrying(
                lambda: self.client.create_run(experiment_id, run_name=name, tags={"mlflow.parentRunId": self.run_id, **tags})
            )
            run_id = child.info.run_id
            now = int(time.time() * 1000)
            clean = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None and np.isfinite(v)]
            retrying(
                lambda: self.client.log_batch(
                    run_id,
                    metrics=clean,
                    params=[Param(k, param_value(v)) for k, v in params.items()],
                    tags=[RunTag("mlflow.runName", name)],
                )
            )
            for path in artifacts:
                if path.is_dir():
                    retrying(lambda p=path: self.client.log_artifacts(run_id, str(p)))
                elif path.exists():
                    retrying(lambda p=path: self.client.log_artifact(run_id, str(p)))
            retrying(lambda: self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED"))
        except Exception as exc:
            raise_classified(exc, f"logging search trial `{name}` (run {self.run_id})")
        return run_id

    def end(self, status: str) -> None:
        """End the run; a failed end is retried within the cleanup clock, then given up (the next
        run of the same chain ends it: end_orphans)."""
        try:
            if status == "FINISHED":  # a later identical run took this one for an orphan: undo its mark
                tags = self.client.get_run(self.run_id).data.tags
                if "pipeline_stage.ended_by" in tags:
                    self.client.delete_tag(self.run_id, "pipeline_stage.ended_by")
                    self.client.delete_tag(self.run_id, "pipeline_stage.end_reason")
                self.client.set_terminated(self.run_id, status)
            else:
                self.cleanup.run(lambda: self.client.set_terminated(self.run_id, status))
        except Exception as exc:
            if status == "FINISHED":
                raise_classified(exc, "ending the run")
            # Ending a failed run is best effort (the error being reported matters more): if the
            # server is gone for good, the run stays RUNNING until the next run ends it (end_orphans).
        finally:
            try:
                self.mlflow.end_run(status=status)  # clears the active run locally
            except Exception:
                pass
