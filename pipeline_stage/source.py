"""The source model: resolve its URI in MLflow, download it, load it (Keras or SavedModel)."""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_stage.errors import InputError, TrackingError


@dataclass
class SourceInfo:
    """Lineage of the source model, as tags on the registered version."""

    uri: str
    name: str | None = None
    version: str | None = None
    run_id: str | None = None

    def tags(self) -> dict[str, str]:
        out = {"source.uri": self.uri}
        for key in ("name", "version", "run_id"):
            value = getattr(self, key)
            if value:
                out[f"source.{key}"] = str(value)
        return out


@dataclass
class SourceModel:
    """A loaded model: a Keras model, or a SavedModel directory (convert and tflite steps only)."""

    info: SourceInfo
    path: Path
    keras_model: Any = None
    saved_model_dir: Path | None = None
    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def input_shape(self) -> tuple:
        if self.keras_model is not None:
            shape = self.keras_model.inputs[0].shape
        else:
            shape = self._input_spec()[1].shape
        return tuple(-1 if d is None else int(d) for d in shape[1:])

    def _serving_fn(self):
        from pipeline_stage._tf import import_tf

        if "serving_fn" not in self.cache:
            self.cache["serving_fn"] = import_tf().saved_model.load(str(self.saved_model_dir)).signatures["serving_default"]
        return self.cache["serving_fn"]

    def _input_spec(self):
        return next(iter(self._serving_fn().structured_input_signature[1].items()))

    def predict(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        if self.keras_model is not None:
            out = self.keras_model.predict(x, batch_size=batch_size, verbose=0)
        else:
            from pipeline_stage._tf import import_tf

            tf = import_tf()
            fn, (name, _) = self._serving_fn(), self._input_spec()
            chunks = []
            for start in range(0, len(x), batch_size):
                res = fn(**{name: tf.constant(x[start:start + batch_size])})
                chunks.append(next(iter(res.values())).numpy())
            out = np.concatenate(chunks)
        return np.asarray(first_output(out))


def first_output(out: Any) -> Any:
    """The first output of a model that returns a dict or a list of outputs (the evaluated one)."""
    if isinstance(out, dict):
        return next(iter(out.values()))
    if isinstance(out, (list, tuple)):
        return out[0]
    return out


def resolve(uri: str, client) -> SourceInfo:
    """Find which registered version / run a model URI means; InputError when it does not exist."""
    from mlflow.exceptions import MlflowException

    info = SourceInfo(uri=uri)
    try:
        if uri.startswith("models:/"):
            rest = uri[len("models:/"):]
            if "@" in rest:
                name, alias = rest.split("@", 1)
                mv = client.get_model_version_by_alias(name, alias)
            elif re.fullmatch(r"m-[0-9a-f]+", rest):
                logged = client.get_logged_model(rest)
                info.run_id = logged.source_run_id
                return info
            else:
                name, version = rest.rsplit("/", 1)
                if version == "latest":
                    versions = client.search_model_versions(f"name='{name}'", order_by=["version_number DESC"], max_results=1)
                    if not versions:
                        raise InputError(f"registered model `{name}` has no versions", hint="register a version first")
                    mv = versions[0]
                else:
                    mv = client.get_model_version(name, version)
            info.name, info.version, info.run_id = mv.name, str(mv.version), mv.run_id
        elif uri.startswith("runs:/"):
            run_id = uri[len("runs:/"):].split("/", 1)[0]
            client.get_run(run_id)
            info.run_id = run_id
    except MlflowException as exc:
        code = getattr(exc, "error_code", "")
        if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise InputError(f"model `{uri}` does not exist in the tracking server: {_first_line(exc)}",
                             hint="check the name, version or alias (`mlflow models` / the MLflow UI list them)") from None
        raise TrackingError(f"could not resolve model `{uri}`: {_first_line(exc)}") from exc
    return info


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def download(uri: str, dst: Path) -> Path:
    """Download a model (or local path) into `dst`; return the local path."""
    local = Path(uri)
    if not uri.startswith(("models:/", "runs:/")) and "://" not in uri:
        if not local.exists():
            raise InputError(f"model path `{uri}` does not exist", hint="give a models:/ or runs:/ URI, or an existing .keras file or SavedModel folder")
        return local
    import mlflow
    from mlflow.exceptions import MlflowException

    dst.mkdir(parents=True, exist_ok=True)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except MlflowException as exc:
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise InputError(f"model `{uri}` could not be downloaded: {_first_line(exc)}") from None
        raise TrackingError(f"downloading model `{uri}` failed: {_first_line(exc)}") from exc
    except OSError as exc:
        raise InputError(f"model `{uri}` could not be downloaded: {exc}") from None


def find_model_file(root: Path) -> tuple[str, Path]:
    """Find what to load in a downloaded artifact: ('keras', file) or ('saved_model', dir)."""
    if root.is_file():
        if root.suffix in (".keras", ".h5"):
            return "keras", root
        raise InputError(f"model file `{root.name}` is not a .keras or .h5 file",
                         hint="log the model with mlflow.tensorflow.log_model, or give a SavedModel folder")
    candidates = sorted(root.rglob("*.keras")) + sorted(root.rglob("*.h5"))
    if candidates:
        return "keras", candidates[0]
    saved = sorted(p.parent for p in root.rglob("saved_model.pb"))
    if saved:
        return "saved_model", saved[0]
    raise InputError(f"no Keras model (.keras/.h5) or SavedModel (saved_model.pb) found in `{root}`",
                     hint="log the model with mlflow.tensorflow.log_model(model, name='model')")


def load(info: SourceInfo, workdir: Path, *, safe_mode: bool = True, custom_objects: dict | None = None) -> SourceModel:
    """Download and load the source model (Keras with ``safe_mode`` unless the manifest allows otherwise)."""
    root = download(info.uri, workdir / "source-model")
    kind, path = find_model_file(root)
    from pipeline_stage._tf import import_tf

    import_tf()
    if kind == "saved_model":
        return SourceModel(info=info, path=path, saved_model_dir=path)
    import keras

    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        raise InputError(f"model `{info.uri}` could not be loaded ({path.name}): the file is corrupt, not a .keras zip archive",
                         hint="log the model again (mlflow.tensorflow.log_model)")
    try:
        model = keras.saving.load_model(str(path), compile=False, safe_mode=safe_mode, custom_objects=custom_objects or None)
    except (TypeError, ValueError) as exc:
        text = str(exc)
        if "safe_mode" in text or "Lambda" in text:
            raise InputError(f"model `{info.uri}` contains code (a Lambda layer) that loading would execute",
                             hint="replace the Lambda with a registered custom layer, or, for a model you trust, "
                                  "set `allow_unsafe_deserialization: true` in the manifest") from None
        if "custom" in text.lower() or "Could not locate" in text or "Unknown layer" in text:
            names = sorted(set(re.findall(r"class[_ ]name[\"']?:? ?[\"']?([\w>.]+)", text)))[:3]
            raise InputError(f"model `{info.uri}` uses a custom layer or object Keras cannot find"
                             + (f" ({', '.join(names)})" if names else "") + f": {_first_line(exc)[:200]}",
                             hint="install a plugin that implements the `register_keras_objects(register)` hook and "
                                  "calls register('package>ClassName', TheClass)") from None
        raise InputError(f"model `{info.uri}` could not be loaded: {_first_line(exc)}") from None
    except Exception as exc:  # a corrupt archive surfaces as zipfile/OSError/h5py errors
        raise InputError(f"model `{info.uri}` could not be loaded ({path.name}): {type(exc).__name__}: {_first_line(exc)}",
                         hint="the artifact may be corrupt: log the model again") from None
    return SourceModel(info=info, path=path, keras_model=model)
