"""MLflow's model registry: register the .tflite as a new version, reuse an identical one, and
apply the alias rule."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_stage.contract.errors import InputError, TrackingError
from pipeline_stage.contract.report import FileDigest, Registered, Report
from pipeline_stage.engine.litert_runtime import op_registerers_in_use
from pipeline_stage.mlflow_io import integrity
from pipeline_stage.mlflow_io.failures import concurrent_write, is_missing, raise_classified
from pipeline_stage.mlflow_io.registry_rules import (
    DEDUPLICATED,
    PASSED_TAG,
    alias_holder,
    find_reusable,
    identity_of,
    registered_first,
    settle_alias,
    until_ready,
)
from pipeline_stage.mlflow_io.stage_run import StageRun, tag_value
from pipeline_stage.mlflow_io.tracking import first_line, redact

logger = logging.getLogger(__name__)

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
RUNTIME_CODE = Path(__file__).parents[1] / "engine" / "litert_runtime.py"
TFLITE_ARTIFACT = "tflite/model.tflite"  # stable path of the raw flatbuffer in the stage's run
PYFUNC_DIGESTS = "pipeline_stage.sha256"  # the model_config key pyfunc_model.py checks when it loads
OP_REGISTERERS = "pipeline_stage.op_registerers"  # custom op kernels the pyfunc's interpreter loads


def check_may_register(client, name: str) -> None:
    """Before the source is downloaded: whether this identity may create versions of registered
    model `name` on this server (MLflow's permissions: EDIT on the model, which also moves its
    aliases). The probe is a version-create request without a source, which a server that
    permits it rejects as incomplete and one that does not refuses with PERMISSION_DENIED: nothing
    is created either way. A model that does not exist yet is not probed (whoever may create a
    model may register its first version); nor is a local store, which has no permissions."""
    import mlflow
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    tracking = mlflow.get_tracking_uri()
    if not tracking.startswith(("http://", "https://")):
        return
    try:
        client.get_registered_model(name)
    except Exception as exc:
        if is_missing(exc):
            return
        raise_classified(exc, f"reading registered model `{name}`")
    creds = get_default_host_creds(tracking)
    try:
        answer = http_request(creds, "/api/2.0/mlflow/model-versions/create", "POST", json={"name": name}, max_retries=2)
    except Exception as exc:
        raise_classified(exc, f"checking the permission to register versions of `{name}`")
    if answer.status_code == 403:
        user = creds.username or ("the token's identity" if creds.token else "the anonymous user")
        raise InputError(
            f"MLflow user `{user}` may not create versions of registered model `{name}` on {redact(tracking)} "
            "(the server answered PERMISSION_DENIED; registering a version and moving its alias need EDIT on the model)",
            hint=f"ask an owner of `{name}` (MANAGE) to grant `{user}` EDIT on it, or register under a name `{user}` may edit",
        )
    if answer.status_code == 200:  # a server that took a version without a source: take it back
        version = answer.json().get("model_version", {}).get("version")
        if version:
            client.delete_model_version(name, version)


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


def _pyfunc_files(tflite_path: Path, attachments: dict[str, Path]) -> dict[str, str]:
    """The files the pyfunc checks when it loads, by their path in the logged model, with the
    sha256 they must have (they travel inside the model, in its model_config): the .tflite, the
    files registered beside it (compiled models), the code."""
    return {
        "artifacts/model.tflite": integrity.sha256_of(tflite_path),
        **{f"artifacts/{path.name}": integrity.sha256_of(path) for path in attachments.values()},
        f"code/{RUNTIME_CODE.name}": integrity.sha256_of(RUNTIME_CODE),
        PYFUNC_CODE.name: integrity.sha256_of(PYFUNC_CODE),
    }


def register_version(
    run: StageRun,
    *,
    name: str,
    tflite_path: Path,
    sample: np.ndarray | None,
    tags: dict[str, str],
    alias: str | None,
    identity: dict[str, str] | None = None,
    record: Callable[[list[FileDigest]], None] = lambda files: None,
    attachments: dict[str, Path] | None = None,
) -> Registered:
    """Log the .tflite as a pyfunc model, register it as a new version of `name`, then settle `alias`.
    `attachments` (by name: files such as compiled models) are logged beside the .tflite, in the
    same model, their digests checked like its.

    The logged model's stored files are read back and digested before the version exists: the
    version is created with those digests among its tags (`record` gets them too), so no version
    is ever without them, and a store that kept other bytes than the stage measured fails here.
    The version is complete (artifacts, tags) before the alias moves; if anything fails after the
    version was created, the version is deleted again so no half-registered version remains (a
    rollback that fails is logged and noted on the error).

    With `identity` (a passing run without --new-version), identical stages that registered at the
    same moment keep one version: the earliest; the others delete theirs and reuse it.
    """
    attachments = attachments or {}
    digests = _pyfunc_files(tflite_path, attachments)
    info = _log_pyfunc(run, tflite_path, sample, attachments, digests)
    files = _stored_digests(info, tflite_path, digests)
    record(files)
    tags = {**tags, **integrity.as_tags(files), **({DEDUPLICATED: "true"} if identity is not None else {})}
    client = run.client
    undo = _Undo(run, name, alias)
    try:
        undo.previous = alias_holder(client, name, alias) if alias else None
        mv = undo.version = _create_version(run, name, info, tags)
        if identity is not None:
            first = registered_first(client, name, identity, mine=str(mv.version))
            if first is not None:
                # an identical stage registered the same chain on the same source first: keep its version
                run.cleanup.run(lambda: client.delete_model_version(name, mv.version))
                return reuse_version(client, first, alias, trusted=frozenset({str(first.version)}), deduplicated=str(mv.version))
        undo.alias_touched = bool(alias)
        holder = settle_alias(client, name, alias, trusted=frozenset({str(mv.version)})) if alias else None
    except Exception as exc:
        failed = undo.all()
        try:
            raise_classified(exc, f"registering a version of `{name}`")
        except BaseException as raised:
            for note in failed:
                raised.add_note(note)
            raise
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


def _log_pyfunc(
    run: StageRun, tflite_path: Path, sample: np.ndarray | None, attachments: dict[str, Path], digests: dict[str, str]
):
    """The .tflite (and `attachments` beside it) logged as a pyfunc model (its signature from a run
    on `sample`; `digests`, the files' sha256, in its config), the run's queued metrics sent linked
    to it; MLflow's ModelInfo."""
    import mlflow
    from mlflow.models import infer_signature

    from pipeline_stage.engine.heavy_imports import import_heavy

    import_heavy("mlflow.pyfunc")  # what log_model needs (mlflow loads it lazily)
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
            artifacts={"tflite": str(tflite_path), **{k: str(v) for k, v in attachments.items()}},
            code_paths=[str(RUNTIME_CODE)],
            signature=signature,
            model_config={PYFUNC_DIGESTS: digests, OP_REGISTERERS: op_registerers_in_use()},
            pip_requirements=[
                f"ai-edge-litert=={dist_version('ai-edge-litert')}",
                f"numpy=={np.__version__}",
                f"mlflow=={mlflow.__version__}",
            ],
        )
    # The run's metrics so far go now, linked to the logged model (log_model found none on the run
    # to link: StageRun queues them), in one request.
    run.flush(model_id=getattr(info, "model_id", None))
    return info


def _stored_digests(info, tflite_path: Path, expected: dict[str, str]) -> list[FileDigest]:
    """The logged model's files as the store holds them, read back and digested (refused when they
    differ from `expected`, what was uploaded), and the run's raw .tflite."""
    with tempfile.TemporaryDirectory(prefix="pipeline-stage-stored-") as tmp:
        files = integrity.stored_folder(info.model_uri, Path(tmp), f"the logged model {info.model_uri}")
    stored = {f.path[len(integrity.MODEL) + 1 :]: f.sha256 for f in files}
    changed = [p for p, sha in expected.items() if stored.get(p) != sha]
    if changed:
        raise TrackingError(
            f"the artifact store holds other bytes than the stage uploaded for {info.model_uri}: {', '.join(changed)}",
            hint="the store altered or truncated the upload; retry the step",
        )
    return [*files, integrity.digest_file(tflite_path, f"{integrity.RUN}/{TFLITE_ARTIFACT}")]


def _create_version(run: StageRun, name: str, info, tags: dict[str, str]):
    """The registered model (created if missing: another stage creating it at the same moment is as
    good) and a new READY version of it with all its tags."""
    import mlflow

    client = run.client
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:
        if not is_missing(exc):
            raise
        concurrent_write(
            lambda: client.create_registered_model(name, description="TFLite models optimized by pipeline-stage"),
            idempotent=True,
        )
    mv = concurrent_write(
        lambda: client.create_model_version(
            name=name,
            source=info.model_uri,
            run_id=run.run_id,
            tags={k: tag_value(v) for k, v in tags.items()},
            model_id=getattr(info, "model_id", None),
        ),
        idempotent=False,
    )
    mv = until_ready(client, mv)
    if mv.status != "READY":
        raise TrackingError(f"model version {name}/{mv.version} ended in status {mv.status}")
    return mv


class _Undo:
    """What a failed registration undoes, within the run's cleanup clock: the alias put back where
    it was (if it was touched), the half-made version deleted. A server that comes back within the
    clock gets it done; one gone for good leaves a READY, tagged version without the alias, which
    a retry reuses."""

    def __init__(self, run: StageRun, name: str, alias: str | None):
        self.stage_run, self.name, self.alias = run, name, alias
        self.previous: str | None = None
        self.version = None
        self.alias_touched = False

    def all(self) -> list[str]:
        """Undo; returns a sentence for each undo that failed (each also logged)."""
        client, name, alias, failed = self.stage_run.client, self.name, self.alias, []
        steps = []
        if self.alias_touched:
            if self.previous is not None:
                steps.append(
                    (
                        f"put alias `{alias}` back on version {self.previous}",
                        lambda: client.set_registered_model_alias(name, alias, self.previous),
                    )
                )
            else:
                steps.append((f"remove alias `{alias}`", lambda: client.delete_registered_model_alias(name, alias)))
        if self.version is not None:
            version = self.version.version
            steps.append((f"delete the half-made version {name}/{version}", lambda: client.delete_model_version(name, version)))
        for what, undo in steps:
            try:
                self.stage_run.cleanup.run(undo)
            except Exception as exc:
                sentence = f"rollback failed: could not {what}: {type(exc).__name__}: {first_line(exc)}"
                logger.warning("%s", sentence)
                failed.append(sentence)
        return failed


def reuse_version(
    client, mv, alias: str | None, *, trusted: frozenset = frozenset(), deduplicated: str | None = None
) -> Registered:
    """Report an earlier identical version as this run's result (and settle the alias)."""
    holder = settle_alias(client, mv.name, alias, trusted=trusted) if alias else None
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
        deduplicated=deduplicated,
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
        PASSED_TAG: str(report.passed).lower(),
        "pipeline_stage.chain": " -> ".join(s.name for s in report.steps) or "(none)",
        "tflite_artifact": f"runs:/{report.run_id}/{TFLITE_ARTIFACT}",
        "pipeline_stage.priority": str(registration.priority),
    }
    if registration.alias:
        tags["pipeline_stage.alias"] = registration.alias
    for name, value in (report.candidate or {}).items():
        tags[f"metric.{name}"] = value
    for name, value in report.compared_baseline().items():  # what the candidate's values were compared with
        tags[f"baseline.{name}"] = value
    for g in report.gates:
        tags[f"gate.{g.metric}.{g.rule}"] = g.tag_text()
    for c in report.compiled:  # a compiled model: its file and what it was made with, or why there is none
        tags[f"pipeline_stage.compiled.{c.key}"] = (
            f"{c.artifact} sha256={c.sha256} sdk={c.sdk} ops_offloaded={c.partition.get('share')}"
            + ("" if c.evaluated else " not evaluated here")
            if c.status == "compiled"
            else f"{c.status}: {c.error}"
        )
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
    attachments: dict[str, Path] | None = None,
) -> Registered:
    """Register the run's .tflite (or, for a passing retry of the same chain on the same source
    version, reuse the version registered before, once its stored files verify); the alias only
    when every gate passed. The registered files' digests are added to `report.artifacts`."""
    try:
        earlier, identity, replaced = None, None, None
        if report.passed and not new_version:
            identity = identity_of(tags)
            earlier = find_reusable(run.client, registration.name, identity)
            if earlier is not None:
                verdict = integrity.verify_version(run.client, registration.name, str(earlier.version), mv=earlier)
                if not verdict.ok:  # never point an alias at altered files: register anew instead
                    replaced = f"{verdict.subject}: " + "; ".join(m.text() for m in verdict.mismatches)
                    earlier = None
        if earlier is not None:
            return reuse_version(run.client, earlier, registration.alias, trusted=frozenset({str(earlier.version)}))
        registered = register_version(
            run,
            name=registration.name,
            tflite_path=tflite_path,
            sample=sample,
            tags=tags,
            alias=registration.alias if report.passed else None,
            identity=identity,
            attachments=attachments,
            record=lambda files: report.artifacts.extend(f for f in files if f.path.startswith(integrity.MODEL + "/")),
        )
        return registered.model_copy(update={"replaced": replaced}) if replaced else registered
    except Exception as exc:
        raise_classified(exc, f"registering `{registration.name}`")
