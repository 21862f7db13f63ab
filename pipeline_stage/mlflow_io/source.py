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


def files_uri(info: SourceRef, client) -> str:
    """Where the source model's files are: for a registered version (by number or alias), the
    version's download URI, one request, which :func:`download` and the store probe then use as
    they are (given `models:/`, MLflow would resolve it again for each: two requests apiece);
    any other URI unchanged."""
    if not (info.uri.startswith("models:/") and info.name and info.version):
        return info.uri
    try:
        return client.get_model_version_download_uri(info.name, info.version)
    except Exception as exc:
        raise_classified(
            exc,
            f"resolving the files of model `{info.uri}`",
            missing=f"model `{info.uri}` does not exist in the tracking server",
            missing_hint="check the name, version or alias (`mlflow models` / the MLflow UI list them)",
        )


def download(uri: str, dst: Path, files: str | None = None) -> Path:
    """Download a model (or local path) into `dst`; return the local path. `files` is where its
    files are when :func:`files_uri` found that out already; `uri` names it in messages."""
    resolved = files is not None and files != uri
    local = Path(uri)
    if not resolved and not uri.startswith(("models:/", "runs:/")) and "://" not in uri:
        if not local.exists():
            raise InputError(
                f"model path `{uri}` does not exist",
                hint="give a models:/ or runs:/ URI, or an existing .keras file or SavedModel folder",
            )
        return local
    dst.mkdir(parents=True, exist_ok=True)
    return download_artifact(
        files if resolved else uri,
        dst,
        f"downloading model `{uri}`",
        f"model `{uri}` has no files at `{files}`" if resolved else f"model `{uri}` does not exist in the tracking server",
        "check the model URI and that its run still has the artifacts",
    )


def model_flavors(uri: str, dst: Path, files: str | None = None) -> list[str]:
    """The MLflow flavors the model's MLmodel file names, reading that one file (not the model's
    other files); [] where it has none or it cannot be read (the download then says why)."""
    import yaml

    local = Path(uri)
    if files in (None, uri) and not uri.startswith(("models:/", "runs:/")) and "://" not in uri:
        mlmodel = local / "MLmodel"
    else:
        import mlflow

        dst.mkdir(parents=True, exist_ok=True)
        try:
            mlmodel = Path(
                mlflow.artifacts.download_artifacts(artifact_uri=f"{(files or uri).rstrip('/')}/MLmodel", dst_path=str(dst))
            )
        except Exception:
            return []
    try:
        flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors")
    except (OSError, yaml.YAMLError, AttributeError):
        return []
    return sorted(flavors) if isinstance(flavors, dict) else []


def logged_dataset_uri(run_id: str | None, name: str, role: str, field: str) -> str:
    """Where the dataset `name` came from, as the source model's run logged it (mlflow.log_input;
    a stage logs its own so): the URI its source records (`uri`, `url` or `path`). Several of that
    name: the one logged with context `role` (evaluation, calibration, training)."""
    import json

    import mlflow

    what = f"`{field}`: `dataset:{name}`"
    if not run_id:
        raise InputError(
            f"{what} names a dataset the source model's run logged, but the source has no run", hint="give the data's URI"
        )
    try:
        inputs = mlflow.MlflowClient().get_run(run_id).inputs.dataset_inputs
    except Exception as exc:
        raise_classified(exc, f"reading the datasets of run {run_id}")
    found = [i for i in inputs if i.dataset.name == name]
    if len(found) > 1:
        found = [i for i in found if any(t.key == "mlflow.data.context" and t.value == role for t in i.tags)] or found[-1:]
    if not found:
        logged = ", ".join(sorted({i.dataset.name for i in inputs})) or "none"
        raise InputError(
            f"{what}: the source model's run {run_id} logged no dataset `{name}` (logged: {logged})",
            hint="name one of those, or give the data's URI",
        )
    dataset = found[0].dataset
    try:
        source = json.loads(dataset.source)
    except ValueError:
        source = {}
    uri = next((source[k] for k in ("uri", "url", "path") if isinstance(source, dict) and source.get(k)), None)
    if not uri:
        raise InputError(
            f"{what}: its source ({dataset.source_type}) records no URI the stage can download",
            hint="give the data's URI",
        )
    return uri


def is_remote(uri: str) -> bool:
    """Whether a manifest's data URI names something to download (a runs:/, models:/ or other URI),
    not a local path."""
    return "://" in uri or uri.startswith(("runs:/", "models:/"))


def is_glob(uri: str) -> bool:
    """Whether a data URI's file name is a pattern of shards (`eval-*.tfrecord`, `part-??.npz`)."""
    return any(c in uri.rstrip("/").rsplit("/", 1)[-1] for c in "*?[")


def list_data_shards(uri: str, field: str) -> list[str]:
    """The URIs of the artifacts a remote glob matches (only the file name may be a pattern),
    sorted by name, listed in the artifact store without downloading anything."""
    import fnmatch
    import posixpath

    import mlflow

    from pipeline_stage.mlflow_io.tracking import redact

    folder, pattern = uri.rstrip("/").rsplit("/", 1)
    if is_glob(folder):
        raise InputError(f"`{field}`: `{redact(uri)}`: only the file name may be a pattern", hint="name the folder in full")
    try:
        listed = mlflow.artifacts.list_artifacts(artifact_uri=folder)
    except Exception as exc:
        raise_classified(
            exc,
            f"listing `{field}` ({redact(folder)})",
            missing=f"`{field}`: cannot list `{redact(folder)}`",
            missing_hint="check the run id and folder (the MLflow UI lists a run's artifacts)",
        )
    files = sorted(posixpath.basename(i.path) for i in listed if not i.is_dir)
    matched = [name for name in files if fnmatch.fnmatchcase(name, pattern)]
    if not matched:
        there = ", ".join(files[:10]) + (", ..." if len(files) > 10 else "") if files else "nothing"
        raise InputError(
            f"`{field}`: no file in `{redact(folder)}` matches `{pattern}` (there: {there})",
            hint="check the pattern (a glob such as `eval-*.tfrecord`)",
        )
    return [f"{folder}/{name}" for name in matched]


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
