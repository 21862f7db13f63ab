"""MLflow in and out: the stage's run, its artifacts, and the registered model version."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_stage.errors import StageError, TrackingError
from pipeline_stage.tracking import redact

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
RUNTIME_CODE = Path(__file__).with_name("litert_runtime.py")
TFLITE_ARTIFACT = "tflite/model.tflite"  # stable path of the raw flatbuffer in the stage's run


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
            time.sleep(delay * 2 ** attempt)


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
            self.mlflow.log_params(dict(items[i:i + 100]))

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

    def child_run(self, name: str, *, params: dict[str, str], metrics: dict[str, float], tags: dict[str, str],
                  artifacts: list[Path], failed: bool = False) -> str:
        """A finished nested run under this one (a search trial); returns its id. Tag and param values
        are bounded here, as MLflow requires (tag_value, param_value)."""
        from mlflow.entities import Metric, Param, RunTag

        experiment_id = self.run.info.experiment_id
        tags = {k: tag_value(v) for k, v in tags.items()}
        child = retrying(lambda: self.client.create_run(experiment_id, run_name=name, tags={"mlflow.parentRunId": self.run_id, **tags}))
        run_id = child.info.run_id
        now = int(time.time() * 1000)
        clean = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None and np.isfinite(v)]
        retrying(lambda: self.client.log_batch(run_id, metrics=clean, params=[Param(k, param_value(v)) for k, v in params.items()],
                                               tags=[RunTag("mlflow.runName", name)]))
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


def all_versions(client, name: str) -> list:
    """Every version of a registered model (none if it does not exist)."""
    out, token = [], None
    while True:
        page = client.search_model_versions(f"name='{name}'", max_results=1000, page_token=token)
        out.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return out


def find_reusable(client, name: str, identity: dict[str, str]) -> Any:
    """A READY, passing version registered before for the same source version and chain digest.

    This makes a retried step (Kubeflow retries, a re-run pipeline) reuse its earlier result
    instead of registering version N+1 of the same thing.
    """
    for mv in sorted(all_versions(client, name), key=lambda v: int(v.version)):
        tags = mv.tags or {}
        if mv.status == "READY" and tags.get("pipeline_stage.passed") == "true" and \
                all(tags.get(k) == v for k, v in identity.items()):
            return mv
    return None


def alias_winner(versions: list, alias: str) -> Any:
    """The rule: among READY versions that passed and asked for `alias`, the newest of the
    highest `register.priority`. Failed versions never win."""
    eligible = [v for v in versions if v.status == "READY" and (v.tags or {}).get("pipeline_stage.passed") == "true"
                and (v.tags or {}).get("pipeline_stage.alias") == alias]
    if not eligible:
        return None
    return max(eligible, key=lambda v: (int((v.tags or {}).get("pipeline_stage.priority", "0")), int(v.version)))


def settle_alias(client, name: str, alias: str, attempts: int = 10) -> str | None:
    """Point `alias` at the rule's winner; re-check after writing, because aliases have no
    compare-and-set: a stage that registered meanwhile saw our version, so the last writer is right."""
    chosen = None
    for _ in range(attempts):
        winner = alias_winner(all_versions(client, name), alias)
        if winner is None:
            return None
        version = str(winner.version)  # an int from a local store, a str over REST
        if version != chosen:
            client.set_registered_model_alias(name, alias, version)
            chosen = version
            continue
        return chosen
    return chosen


def register_version(run: StageRun, *, name: str, tflite_path: Path, sample: np.ndarray | None,
                     tags: dict[str, str], alias: str | None) -> dict[str, Any]:
    """Log the .tflite as a pyfunc model, register it as a new version of `name`, then settle `alias`.

    The version is complete (artifacts, tags) before the alias moves; if anything fails after the
    version was created, the version is deleted again so no half-registered version remains.
    """
    import mlflow
    from mlflow.models import infer_signature

    signature = None
    if sample is not None:
        from pipeline_stage.litert_runtime import TFLiteModel

        x = sample.astype(np.float32)
        signature = infer_signature(x, TFLiteModel(tflite_path.read_bytes()).predict(x))
    from importlib.metadata import version as dist_version

    info = mlflow.pyfunc.log_model(
        name="tflite_model",
        python_model=str(PYFUNC_CODE),
        artifacts={"tflite": str(tflite_path)},
        code_paths=[str(RUNTIME_CODE)],
        signature=signature,
        pip_requirements=[f"ai-edge-litert=={dist_version('ai-edge-litert')}", f"numpy=={np.__version__}",
                          f"mlflow=={mlflow.__version__}"],
    )
    client = run.client
    mv = None
    previous = _alias_holder(client, name, alias) if alias else None
    alias_touched = False
    try:
        try:
            client.get_registered_model(name)
        except mlflow.exceptions.MlflowException:
            try:
                client.create_registered_model(name, description="TFLite models optimized by pipeline-stage")
            except mlflow.exceptions.MlflowException as exc:  # another stage created it meanwhile
                if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                    raise
        mv = client.create_model_version(name=name, source=info.model_uri, run_id=run.run_id,
                                         tags={k: tag_value(v) for k, v in tags.items()},
                                         model_id=getattr(info, "model_id", None))
        deadline = time.monotonic() + 300
        while mv.status == "PENDING_REGISTRATION" and time.monotonic() < deadline:
            time.sleep(0.5)
            mv = client.get_model_version(name, mv.version)
        if mv.status != "READY":
            raise TrackingError(f"model version {name}/{mv.version} ended in status {mv.status}")
        alias_touched = bool(alias)
        holder = settle_alias(client, name, alias) if alias else None
    except Exception as exc:
        if alias_touched:  # put the alias back where it was
            try:
                if previous is not None:
                    retrying(lambda: client.set_registered_model_alias(name, alias, previous))
                else:
                    retrying(lambda: client.delete_registered_model_alias(name, alias))
            except Exception:
                pass
        if mv is not None:
            try:
                retrying(lambda: client.delete_model_version(name, mv.version))
            except Exception:
                pass
        if isinstance(exc, StageError):
            raise
        raise TrackingError(f"registering `{name}` failed: {redact(str(exc))[:300]}") from exc
    return {"name": name, "version": str(mv.version), "alias": alias if holder == str(mv.version) else None,
            "alias_holder": holder, "uri": f"models:/{name}/{mv.version}", "reused": False,
            "run_id": run.run_id, "model_uri": info.model_uri,
            "tflite_uri": f"runs:/{run.run_id}/{TFLITE_ARTIFACT}"}


def _alias_holder(client, name: str, alias: str) -> str | None:
    import mlflow

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def reuse_version(client, mv, alias: str | None) -> dict[str, Any]:
    """Report an earlier identical version as this run's result (and settle the alias)."""
    holder = settle_alias(client, mv.name, alias) if alias else None
    return {"name": mv.name, "version": str(mv.version), "alias": alias if holder == str(mv.version) else None,
            "alias_holder": holder, "uri": f"models:/{mv.name}/{mv.version}", "reused": True,
            "run_id": (mv.tags or {}).get("pipeline_stage.run_id"), "model_uri": mv.source,
            "tflite_uri": (mv.tags or {}).get("tflite_artifact")}


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str))
    tmp.replace(path)  # readers never see a half-written report
