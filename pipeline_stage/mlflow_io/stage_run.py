"""The stage's MLflow run: params, metrics, artifacts, nested trial runs, and ending it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_stage.contract.errors import TrackingError
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


def retrying(fn, *, attempts: int = 5, delay: float = 0.5):
    """Call `fn` until it succeeds, with exponential backoff (about 15 s in all); re-raise the last error.

    For the calls that clean up after a failure (end the run, delete a half-made version, put an
    alias back): a server that restarts must not leave them undone if it returns within seconds.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except Exception:
            if attempt + 1 == attempts:
                raise
            time.sleep(delay * 2**attempt)


class StageRun:
    """The MLflow run of one stage execution; ends FAILED unless `finish()` is reached."""

    def __init__(self, experiment: str, run_name: str | None = None, tags: dict[str, str] | None = None):
        import mlflow

        self.mlflow = mlflow
        self.client = mlflow.MlflowClient()
        try:
            mlflow.set_experiment(experiment)
            self.run = mlflow.start_run(run_name=run_name, tags=tags)
        except Exception as exc:
            raise TrackingError(f"could not start an MLflow run in experiment `{experiment}`: {redact(str(exc))[:300]}") from exc
        self.run_id = self.run.info.run_id

    def log_params(self, params: dict[str, str]) -> None:
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.mlflow.log_params(dict(items[i : i + 100]))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
        if clean:
            self.mlflow.log_metrics(clean, step=step)

    def log_text(self, text: str, path: str) -> None:
        self.mlflow.log_text(text, path)

    def log_artifact(self, local: Path, artifact_path: str | None = None) -> None:
        self.mlflow.log_artifact(str(local), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.mlflow.set_tags(tags)

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
        return run_id

    def end(self, status: str) -> None:
        try:
            retrying(lambda: self.client.set_terminated(self.run_id, status))
        except Exception:  # the server may be gone for good; nothing more we can do from here
            pass
        finally:
            try:
                self.mlflow.end_run(status=status)  # clears the active run locally
            except Exception:
                pass
