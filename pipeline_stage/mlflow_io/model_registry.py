"""MLflow's model registry: register the .tflite as a new version, reuse an identical one, and
apply the alias rule."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_stage.contract.errors import TrackingError
from pipeline_stage.contract.report import Registered, Report
from pipeline_stage.mlflow_io.failures import is_missing, raise_classified
from pipeline_stage.mlflow_io.stage_run import StageRun, tag_value

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
RUNTIME_CODE = Path(__file__).parents[1] / "engine" / "litert_runtime.py"
TFLITE_ARTIFACT = "tflite/model.tflite"  # stable path of the raw flatbuffer in the stage's run


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
        if (
            mv.status == "READY"
            and tags.get("pipeline_stage.passed") == "true"
            and all(tags.get(k) == v for k, v in identity.items())
        ):
            return mv
    return None


def alias_winner(versions: list, alias: str) -> Any:
    """The rule: among READY versions that passed and asked for `alias`, the newest of the
    highest `register.priority`. Failed versions never win."""
    eligible = [
        v
        for v in versions
        if v.status == "READY"
        and (v.tags or {}).get("pipeline_stage.passed") == "true"
        and (v.tags or {}).get("pipeline_stage.alias") == alias
    ]
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


@contextmanager
def _requirements_read_from_here():
    """log_model checks the pip requirements it is given against this environment, after mapping
    every installed distribution's files to its modules (importlib_metadata.packages_distributions:
    0.2-0.3 s per run). Ours are read from this environment (`dist_version`), so that check finds
    nothing: an empty map for the call skips the scan (MLflow then reads each version with
    importlib.metadata). Left alone when MLflow already built its map or no longer has it."""
    from mlflow.utils import requirements_utils

    if getattr(requirements_utils, "_MODULES_TO_PACKAGES", "absent") is not None:
        yield
        return
    requirements_utils._MODULES_TO_PACKAGES = {}
    try:
        yield
    finally:  # built for real by the next caller that needs it (requirement inference)
        requirements_utils._MODULES_TO_PACKAGES = None
        requirements_utils._PACKAGES_TO_MODULES = None


def register_version(
    run: StageRun, *, name: str, tflite_path: Path, sample: np.ndarray | None, tags: dict[str, str], alias: str | None
) -> Registered:
    """Log the .tflite as a pyfunc model, register it as a new version of `name`, then settle `alias`.

    The version is complete (artifacts, tags) before the alias moves; if anything fails after the
    version was created, the version is deleted again so no half-registered version remains.
    """
    import mlflow
    from mlflow.models import infer_signature

    signature = None
    if sample is not None:
        from pipeline_stage.engine.litert_runtime import TFLiteModel

        # tensor specs for every input and output, by name when there are several
        x = {k: v.astype(np.float32) for k, v in sample.items()} if isinstance(sample, dict) else sample.astype(np.float32)
        outputs = TFLiteModel(tflite_path.read_bytes()).predict_outputs(x)
        signature = infer_signature(x, outputs if len(outputs) > 1 else next(iter(outputs.values())))
    from importlib.metadata import version as dist_version

    with _requirements_read_from_here():
        info = mlflow.pyfunc.log_model(
            name="tflite_model",
            python_model=str(PYFUNC_CODE),
            artifacts={"tflite": str(tflite_path)},
            code_paths=[str(RUNTIME_CODE)],
            signature=signature,
            pip_requirements=[
                f"ai-edge-litert=={dist_version('ai-edge-litert')}",
                f"numpy=={np.__version__}",
                f"mlflow=={mlflow.__version__}",
            ],
        )
    client = run.client
    mv = None
    alias_touched = False
    try:
        previous = _alias_holder(client, name, alias) if alias else None
        try:
            client.get_registered_model(name)
        except mlflow.exceptions.MlflowException as exc:
            if not is_missing(exc):
                raise
            try:
                client.create_registered_model(name, description="TFLite models optimized by pipeline-stage")
            except mlflow.exceptions.MlflowException as exc:  # another stage created it meanwhile
                if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                    raise
        mv = client.create_model_version(
            name=name,
            source=info.model_uri,
            run_id=run.run_id,
            tags={k: tag_value(v) for k, v in tags.items()},
            model_id=getattr(info, "model_id", None),
        )
        deadline = time.monotonic() + 300
        while mv.status == "PENDING_REGISTRATION" and time.monotonic() < deadline:
            time.sleep(0.5)
            mv = client.get_model_version(name, mv.version)
        if mv.status != "READY":
            raise TrackingError(f"model version {name}/{mv.version} ended in status {mv.status}")
        alias_touched = bool(alias)
        holder = settle_alias(client, name, alias) if alias else None
    except Exception as exc:
        # Undo within the run's cleanup clock (a server that comes back within it gets it done;
        # one gone for good leaves a READY, tagged version without the alias, which a retry reuses).
        if alias_touched:  # put the alias back where it was
            try:
                if previous is not None:
                    run.cleanup.run(lambda: client.set_registered_model_alias(name, alias, previous))
                else:
                    run.cleanup.run(lambda: client.delete_registered_model_alias(name, alias))
            except Exception:
                pass
        if mv is not None:
            try:
                run.cleanup.run(lambda: client.delete_model_version(name, mv.version))
            except Exception:
                pass
        raise_classified(exc, f"registering a version of `{name}`")
    return Registered(
        name=name,
        version=str(mv.version),
        alias=alias if holder == str(mv.version) else None,
        alias_holder=holder,
        uri=f"models:/{name}/{mv.version}",
        reused=False,
        run_id=run.run_id,
        model_uri=info.model_uri,
        tflite_uri=f"runs:/{run.run_id}/{TFLITE_ARTIFACT}",
    )


def _alias_holder(client, name: str, alias: str) -> str | None:
    """The version `alias` points at; None when the model or the alias does not exist (an outage
    is raised: taking it for "no alias" would delete the alias on cleanup)."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception as exc:
        if is_missing(exc):
            return None
        raise


def reuse_version(client, mv, alias: str | None) -> Registered:
    """Report an earlier identical version as this run's result (and settle the alias)."""
    holder = settle_alias(client, mv.name, alias) if alias else None
    return Registered(
        name=mv.name,
        version=str(mv.version),
        alias=alias if holder == str(mv.version) else None,
        alias_holder=holder,
        uri=f"models:/{mv.name}/{mv.version}",
        reused=True,
        run_id=(mv.tags or {}).get("pipeline_stage.run_id"),
        model_uri=mv.source,
        tflite_uri=(mv.tags or {}).get("tflite_artifact"),
    )


def version_tags(report: Report, registration: Any, step_tags: dict[str, str], manifest_sha256: str) -> dict[str, str]:
    """The registered version's tags: lineage, chain, every metric and gate verdict, what the steps
    asked for, and the manifest's own tags last."""
    from pipeline_stage.version import __version__

    tags: dict[str, Any] = {
        **report.source.tags(),
        "pipeline_stage.chain_digest": report.manifest.chain_digest,
        "pipeline_stage.manifest_sha256": manifest_sha256,
        "pipeline_stage.version": __version__,
        "pipeline_stage.run_id": report.run_id,
        "pipeline_stage.passed": str(report.passed).lower(),
        "pipeline_stage.chain": " -> ".join(s.name for s in report.steps) or "(none)",
        "tflite_artifact": f"runs:/{report.run_id}/{TFLITE_ARTIFACT}",
        "pipeline_stage.priority": str(registration.priority),
    }
    if registration.alias:
        tags["pipeline_stage.alias"] = registration.alias
    for name, value in (report.candidate or {}).items():
        tags[f"metric.{name}"] = value
    for name, value in report.baseline.items():
        tags[f"baseline.{name}"] = value
    for g in report.gates:
        tags[f"gate.{g.metric}.{g.rule}"] = g.tag_text()
    tags.update(step_tags)
    tags.update(registration.tags)
    return {k: tag_value(v) for k, v in tags.items()}


def publish(
    run: StageRun,
    report: Report,
    registration: Any,
    *,
    tags: dict[str, str],
    tflite_path: Path,
    sample: np.ndarray | None,
    new_version: bool,
) -> Registered:
    """Register the run's .tflite (or, for a passing retry of the same chain on the same source
    version, reuse the version registered before); the alias only when every gate passed."""
    try:
        earlier = None
        if report.passed and not new_version:
            keys = ("source.name", "source.version") if "source.version" in tags else ("source.uri", "source.run_id")
            identity = {k: tags.get(k, "") for k in ("pipeline_stage.chain_digest", *keys)}
            earlier = find_reusable(run.client, registration.name, identity)
        if earlier is not None:
            return reuse_version(run.client, earlier, registration.alias)
        return register_version(
            run,
            name=registration.name,
            tflite_path=tflite_path,
            sample=sample,
            tags=tags,
            alias=registration.alias if report.passed else None,
        )
    except Exception as exc:
        raise_classified(exc, f"registering `{registration.name}`")
