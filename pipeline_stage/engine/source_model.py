"""The source model once it is on local disk: a Keras model (.keras, legacy .h5) or a SavedModel.

Loading a model is engine work (TensorFlow/Keras); finding and downloading it is MLflow I/O
(:mod:`pipeline_stage.mlflow_io.source`).
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_stage.contract.errors import InputError
from pipeline_stage.contract.report import SourceRef


@dataclass
class SourceModel:
    """A loaded model: a Keras model, a SavedModel directory (convert and tflite steps only), or a
    float .tflite (tflite steps, and quantization with the LiteRT Quantizer)."""

    info: SourceRef
    path: Path
    keras_model: Any = None
    saved_model_dir: Path | None = None
    tflite_bytes: bytes | None = None
    signature: str = "serving_default"  # the SavedModel signature that is the model
    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def kind(self) -> str:
        """keras | saved_model | tflite"""
        if self.keras_model is not None:
            return "keras"
        return "tflite" if self.tflite_bytes is not None else "saved_model"

    @property
    def input_shape(self) -> tuple:
        if self.keras_model is not None:
            shape = self.keras_model.inputs[0].shape
        elif self.tflite_bytes is not None:
            return self._tflite().input_shape
        else:
            shape = self._input_spec()[1].shape
        return tuple(-1 if d is None else int(d) for d in shape[1:])

    def _tflite(self):
        from pipeline_stage.engine.litert_runtime import TFLiteModel

        if "tflite" not in self.cache:
            self.cache["tflite"] = TFLiteModel(self.tflite_bytes, threads=os.cpu_count() or 1)
        return self.cache["tflite"]

    def _serving_fn(self):
        from pipeline_stage.engine.tf_env import import_tf

        if "serving_fn" not in self.cache:
            signatures = import_tf().saved_model.load(str(self.saved_model_dir)).signatures
            if self.signature not in signatures:
                raise InputError(
                    f"model `{self.info.uri}` has no signature `{self.signature}` (signatures: {', '.join(sorted(signatures))})",
                    hint="set `signature:` in the manifest to one of them",
                )
            self.cache["serving_fn"] = signatures[self.signature]
        return self.cache["serving_fn"]

    def _input_spec(self):
        return next(iter(self._serving_fn().structured_input_signature[1].items()))

    def predict(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        if self.keras_model is not None:
            out = self.keras_model.predict(x, batch_size=batch_size, verbose=0)
        elif self.tflite_bytes is not None:
            out = self._tflite().predict(np.asarray(x, dtype=np.float32), batch_size=batch_size)
        else:
            from pipeline_stage.engine.tf_env import import_tf

            tf = import_tf()
            fn, (name, _) = self._serving_fn(), self._input_spec()
            chunks = []
            for start in range(0, len(x), batch_size):
                res = fn(**{name: tf.constant(x[start : start + batch_size])})
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


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def find_model_file(root: Path) -> tuple[str, Path]:
    """Find what to load in a downloaded artifact: ('keras', file), ('saved_model', dir) or
    ('tflite', file); a folder (a logged model, a registered pyfunc of this stage) is searched."""
    if root.is_file():
        if root.suffix in (".keras", ".h5"):
            return "keras", root
        if root.suffix == ".tflite":
            return "tflite", root
        raise InputError(
            f"model file `{root.name}` is not a .keras, .h5 or .tflite file",
            hint="log the model with mlflow.tensorflow.log_model, or give a SavedModel folder",
        )
    candidates = sorted(root.rglob("*.keras")) + sorted(root.rglob("*.h5"))
    if candidates:
        return "keras", candidates[0]
    saved = sorted(p.parent for p in root.rglob("saved_model.pb"))
    if saved:
        return "saved_model", saved[0]
    flatbuffers = sorted(root.rglob("*.tflite"))
    if flatbuffers:
        return "tflite", flatbuffers[0]
    raise InputError(
        f"no Keras model (.keras/.h5), SavedModel (saved_model.pb) or .tflite found in `{root}`",
        hint="log the model with mlflow.tensorflow.log_model(model, name='model')",
    )


def load_local(
    path: Path,
    info: SourceRef,
    *,
    safe_mode: bool = True,
    custom_objects: dict | None = None,
    signature: str = "serving_default",
) -> SourceModel:
    """Load the model found under `path` (Keras with ``safe_mode`` unless the manifest allows
    otherwise; for a SavedModel, the `signature` that is the model)."""
    kind, path = find_model_file(path)
    if signature != "serving_default" and kind != "saved_model":
        raise InputError(
            f"`signature: {signature}` selects a SavedModel signature, but `{info.uri}` is a {kind} model",
            hint="remove `signature:` from the manifest",
        )
    if kind == "tflite":
        return SourceModel(info=info, path=path, tflite_bytes=_float_tflite(path, info))
    from pipeline_stage.engine.tf_env import import_tf

    import_tf()
    if kind == "saved_model":
        source = SourceModel(info=info, path=path, saved_model_dir=path, signature=signature)
        source._serving_fn()  # a missing signature fails here, before any work
        return source
    import keras

    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        raise InputError(
            f"model `{info.uri}` could not be loaded ({path.name}): the file is corrupt, not a .keras zip archive",
            hint="log the model again (mlflow.tensorflow.log_model)",
        )
    try:
        model = keras.saving.load_model(str(path), compile=False, safe_mode=safe_mode, custom_objects=custom_objects or None)
    except (TypeError, ValueError) as exc:
        text = str(exc)
        if "safe_mode" in text or "Lambda" in text:
            raise InputError(
                f"model `{info.uri}` contains code (a Lambda layer) that loading would execute",
                hint="replace the Lambda with a registered custom layer, or, for a model you trust, "
                "set `allow_unsafe_deserialization: true` in the manifest",
            ) from None
        if "custom" in text.lower() or "Could not locate" in text or "Unknown layer" in text:
            names = sorted(set(re.findall(r"class[_ ]name[\"']?:? ?[\"']?([\w>.]+)", text)))[:3]
            raise InputError(
                f"model `{info.uri}` uses a custom layer or object Keras cannot find"
                + (f" ({', '.join(names)})" if names else "")
                + f": {first_line(exc)[:200]}",
                hint="install a plugin that implements the `register_keras_objects(register)` hook and "
                "calls register('package>ClassName', TheClass)",
            ) from None
        raise InputError(f"model `{info.uri}` could not be loaded: {first_line(exc)}") from None
    except Exception as exc:  # a corrupt archive surfaces as zipfile/OSError/h5py errors
        raise InputError(
            f"model `{info.uri}` could not be loaded ({path.name}): {type(exc).__name__}: {first_line(exc)}",
            hint="the artifact may be corrupt: log the model again",
        ) from None
    return SourceModel(info=info, path=path, keras_model=model)


def _float_tflite(path: Path, info: SourceRef) -> bytes:
    """The bytes of a .tflite source, refused when it is not a float model the stage can optimize."""
    from pipeline_stage.engine.flatbuffer import read

    data = path.read_bytes()
    try:
        model = read(data)
    except Exception as exc:  # not a flatbuffer at all
        raise InputError(f"model `{info.uri}` ({path.name}) is not a readable .tflite flatbuffer: {first_line(exc)}") from None
    integer = sorted(d for d in model.activation_dtypes() if d in ("INT8", "UINT8", "INT16"))
    if integer:
        raise InputError(
            f"model `{info.uri}` ({path.name}) is already quantized ({', '.join(integer)} activations)",
            hint="give the float .tflite it was made from (or the Keras / SavedModel model)",
        )
    return data
