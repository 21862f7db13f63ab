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
    def input_names(self) -> list[str]:
        """The model's inputs by name (a data set names its arrays after them)."""
        if self.keras_model is not None:
            return keras_input_names(self.keras_model)
        if self.tflite_bytes is not None:
            return self._tflite().input_names
        return list(self._serving_fn().structured_input_signature[1])

    @property
    def output_names(self) -> list[str]:
        """The model's outputs by name (labels `y.<output>` and metrics `<metric>.<output>` use them)."""
        if self.keras_model is not None:
            return keras_output_names(self.keras_model)
        if self.tflite_bytes is not None:
            return self._tflite().output_names
        return list(self._serving_fn().structured_outputs)

    @property
    def input_shapes(self) -> dict[str, tuple]:
        """Each input's shape without the batch axis (-1 for a dynamic dimension)."""
        if self.keras_model is not None:
            shapes = [t.shape for t in self.keras_model.inputs]
        elif self.tflite_bytes is not None:
            return self._tflite().input_shapes
        else:
            shapes = [spec.shape for spec in self._serving_fn().structured_input_signature[1].values()]
        return {n: tuple(-1 if d is None else int(d) for d in s[1:]) for n, s in zip(self.input_names, shapes)}

    @property
    def input_shape(self) -> tuple:
        return next(iter(self.input_shapes.values()))

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

    def predict_batch(self, inputs) -> dict[str, np.ndarray]:
        """Every output by name for one batch of inputs by name (an array stands for the only input);
        the caller batches (:meth:`pipeline_stage.run.evaluation.EvaluationContext.predict`)."""
        names = self.input_names
        if not isinstance(inputs, dict):
            inputs = {names[0]: inputs}
        if self.keras_model is not None:
            return keras_predict_batch(self.keras_model, inputs, self.output_names)
        if self.tflite_bytes is not None:
            return tflite_predict_batch(self._tflite(), inputs, self.output_names)
        from pipeline_stage.engine.tf_env import import_tf

        tf = import_tf()
        out = self._serving_fn()(**{k: tf.constant(v) for k, v in inputs.items()})
        return {name: out[name].numpy() for name in self.output_names}


def keras_predict_batch(model, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
    """A Keras model's outputs by name on one batch: `predict_on_batch`, the compiled step `predict`
    runs, without the per-call data pipeline that `predict` builds (seconds over a run)."""
    feed = inputs if len(inputs) > 1 else next(iter(inputs.values()))
    return outputs_by_name(model.predict_on_batch(feed), output_names)


def tflite_predict_batch(model, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
    """A .tflite's outputs by name on one batch (a `TFLiteModel`, float32 inputs); the only input is
    passed as an array, because the interpreter may name it otherwise than the source model does."""
    feed = {k: np.asarray(v, dtype=np.float32) for k, v in inputs.items()}
    n = len(next(iter(feed.values())))
    return outputs_by_name(
        model.predict_outputs(feed if len(feed) > 1 else next(iter(feed.values())), batch_size=n), output_names
    )


def keras_input_names(model) -> list[str]:
    """A Keras model's input names (its Input layers' names)."""
    return [getattr(t, "name", None) or f"input_{i}" for i, t in enumerate(model.inputs)]


def keras_output_names(model) -> list[str]:
    """A Keras model's output names: the functional model's own, else the layers that produce them."""
    names = getattr(model, "output_names", None)
    if names:
        return list(names)
    out = []
    for i, tensor in enumerate(model.outputs):
        history = getattr(tensor, "_keras_history", None)
        out.append(history.operation.name if history is not None else f"output_{i}")
    return out


def outputs_by_name(out: Any, names: list[str]) -> dict[str, np.ndarray]:
    """A model's outputs (a dict, a list, or one array) by the model's output names; a dict whose
    names differ (a converter's `output_0, output_1`) is taken in order, and a dict with some of the
    names (a model whose other outputs a step removed) keeps those."""
    if isinstance(out, dict):
        if out and set(out) <= set(names):
            return {n: np.asarray(out[n]) for n in names if n in out}
        values = list(out.values())
    else:
        values = list(out) if isinstance(out, (list, tuple)) else [out]
    if len(values) != len(names):
        raise InputError(f"the model returned {len(values)} outputs, expected {len(names)} ({', '.join(names)})")
    return {n: np.asarray(v) for n, v in zip(names, values)}


def aligned_names(given: list[str], names: list[str]) -> list[str]:
    """The model's names for outputs named `given` (the rule of :func:`outputs_by_name`)."""
    return list(outputs_by_name(dict.fromkeys(given), names))


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
    from pipeline_stage.engine.heavy_imports import import_heavy

    keras = import_heavy("keras")
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
