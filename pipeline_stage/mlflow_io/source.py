"""The source model in MLflow: resolve its URI to a version and run, and download it (the engine loads it)."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline_stage.contract.errors import InputError
from pipeline_stage.contract.report import SourceRef
from pipeline_stage.mlflow_io.failures import is_outage, raise_classified


def resolve(uri: str, client) -> SourceRef:
    """Find which registered version / run a model URI means; InputError when it does not exist."""
    found: dict[str, str | None] = {}
    try:
        if uri.startswith("models:/"):
            rest = uri[len("models:/") :]
            if "@" in rest:
                name, alias = rest.split("@", 1)
                mv = client.get_model_version_by_alias(name, alias)
            elif re.fullmatch(r"m-[0-9a-f]+", rest):
                logged = client.get_logged_model(rest)
                return SourceRef(uri=uri, run_id=logged.source_run_id)
            else:
                name, version = rest.rsplit("/", 1)
                if version == "latest":
                    versions = client.search_model_versions(f"name='{name}'", order_by=["version_number DESC"], max_results=1)
                    if not versions:
                        raise InputError(f"registered model `{name}` has no versions", hint="register a version first")
                    mv = versions[0]
                else:
                    mv = client.get_model_version(name, version)
            found = {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id}
        elif uri.startswith("runs:/"):
            run_id = uri[len("runs:/") :].split("/", 1)[0]
            client.get_run(run_id)
            found = {"run_id": run_id}
    except Exception as exc:
        raise_classified(
            exc,
            f"resolving model `{uri}`",
            missing=f"model `{uri}` does not exist in the tracking server",
            missing_hint="check the name, version or alias (`mlflow models` / the MLflow UI list them)",
        )
    return SourceRef(uri=uri, **found)


def download(uri: str, dst: Path) -> Path:
    """Download a model (or local path) into `dst`; return the local path."""
    local = Path(uri)
    if not uri.startswith(("models:/", "runs:/")) and "://" not in uri:
        if not local.exists():
            raise InputError(
                f"model path `{uri}` does not exist",
                hint="give a models:/ or runs:/ URI, or an existing .keras file or SavedModel folder",
            )
        return local
    dst.mkdir(parents=True, exist_ok=True)
    return download_artifact(
        uri,
        dst,
        f"downloading model `{uri}`",
        f"model `{uri}` does not exist in the tracking server",
        "check the model URI and that its run still has the artifacts",
    )


def is_remote(uri: str) -> bool:
    """Whether a manifest's data URI names something to download (a runs:/, models:/ or other URI),
    not a local path."""
    return "://" in uri or uri.startswith(("runs:/", "models:/"))


def download_data(uri: str, dst: Path, field: str) -> Path:
    """Download a data set named in the manifest (`field`, e.g. ``data.evaluation``) into `dst`."""
    from pipeline_stage.mlflow_io.tracking import redact

    dst.mkdir(parents=True, exist_ok=True)
    local = download_artifact(
        uri,
        dst,
        f"downloading `{field}` ({redact(uri)})",
        f"`{field}`: cannot download `{redact(uri)}`",
        "check the run id and artifact path (the MLflow UI lists a run's artifacts)",
    )
    if not local.resolve().is_relative_to(dst.resolve()):
        raise InputError(f"`{field}`: `{redact(uri)}` resolves outside its download folder")
    return local


def download_artifact(uri: str, dst: Path, doing: str, missing: str, missing_hint: str | None = None) -> Path:
    """mlflow.artifacts.download_artifacts, its failures classified by cause: an outage is exit 1,
    a missing run or artifact exit 2."""
    import mlflow

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except Exception as exc:
        if isinstance(exc, OSError) and not is_outage(exc):  # a local file error, not the server
            raise InputError(f"{missing}: {exc}", hint=missing_hint) from None
        raise_classified(exc, doing, missing=missing, missing_hint=missing_hint)
