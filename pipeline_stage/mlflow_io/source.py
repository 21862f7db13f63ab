"""The source model in MLflow: resolve its URI to a version and run, download it, hand it to the engine to load."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline_stage.contract.errors import InputError, TrackingError
from pipeline_stage.contract.report import SourceRef
from pipeline_stage.engine.source_model import SourceModel, first_line, load_local


def resolve(uri: str, client) -> SourceRef:
    """Find which registered version / run a model URI means; InputError when it does not exist."""
    from mlflow.exceptions import MlflowException

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
    except MlflowException as exc:
        code = getattr(exc, "error_code", "")
        if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise InputError(
                f"model `{uri}` does not exist in the tracking server: {first_line(exc)}",
                hint="check the name, version or alias (`mlflow models` / the MLflow UI list them)",
            ) from None
        raise TrackingError(f"could not resolve model `{uri}`: {first_line(exc)}") from exc
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
    import mlflow
    from mlflow.exceptions import MlflowException

    dst.mkdir(parents=True, exist_ok=True)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except MlflowException as exc:
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise InputError(f"model `{uri}` could not be downloaded: {first_line(exc)}") from None
        raise TrackingError(f"downloading model `{uri}` failed: {first_line(exc)}") from exc
    except OSError as exc:
        raise InputError(f"model `{uri}` could not be downloaded: {exc}") from None


def load(
    info: SourceRef,
    workdir: Path,
    *,
    safe_mode: bool = True,
    custom_objects: dict | None = None,
    signature: str = "serving_default",
) -> SourceModel:
    """Download and load the source model."""
    root = download(info.uri, workdir / "source-model")
    return load_local(root, info, safe_mode=safe_mode, custom_objects=custom_objects, signature=signature)


def download_data(uri: str, dst: Path, field: str) -> Path:
    """Download a data set named in the manifest (`field`, e.g. ``data.evaluation``) into `dst`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline_stage.mlflow_io.tracking import redact

    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except MlflowException as exc:
        raise InputError(
            f"`{field}`: cannot download `{redact(uri)}`: {str(exc).splitlines()[0]}",
            hint="check the run id and artifact path (the MLflow UI lists a run's artifacts)",
        ) from None
    except OSError as exc:
        raise InputError(f"`{field}`: cannot download `{redact(uri)}`: {exc}") from None
    if not local.resolve().is_relative_to(dst.resolve()):
        raise InputError(f"`{field}`: `{redact(uri)}` resolves outside its download folder")
    return local
