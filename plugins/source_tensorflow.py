"""Built-in model sources `keras` and `saved_model`: TensorFlow models as MLflow logs them.

``keras`` reads a Keras 3 model (``.keras``) or a legacy Keras 2 ``.h5`` with ``safe_mode`` (a Lambda
layer's code runs only when the manifest allows it) and the custom objects plugins register; its
Keras model is what ``model`` steps edit. ``saved_model`` reads a SavedModel folder and the
signature the manifest names. Both predict with TensorFlow itself (the baseline's reference),
convert to float with the TFLite converter, and give the converter engine that converter
(``tf_converter``) to quantize with.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_stage import (
    InputError,
    ModelSource,
    build_converter,
    first_line,
    hookimpl,
    import_heavy,
    import_tensorflow,
    outputs_by_name,
    run_converter,
)

FLAVORS = ("tensorflow", "keras")  # mlflow.tensorflow.log_model writes `tensorflow`; Keras 3's own flavor `keras`


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


class KerasSource(ModelSource):
    """A Keras model (.keras, or a legacy Keras 2 .h5), loaded with safe_mode."""

    name = "keras"
    editable = True
    title = "a Keras model"
    flavors = FLAVORS
    suffixes = (".keras", ".h5")

    def __init__(self, info, path: Path, keras_model: Any):
        super().__init__(info, path)
        self.keras_model = keras_model

    @classmethod
    def locate(cls, root: Path) -> Path | None:
        if root.is_file():
            return root if root.suffix in cls.suffixes else None
        candidates = sorted(root.rglob("*.keras")) + sorted(root.rglob("*.h5"))
        return candidates[0] if candidates else None

    @classmethod
    def open(cls, path: Path, info, options) -> "KerasSource":
        import_tensorflow()
        keras = import_heavy("keras")
        if path.suffix == ".keras" and not zipfile.is_zipfile(path):
            raise InputError(
                f"model `{info.uri}` could not be loaded ({path.name}): the file is corrupt, not a .keras zip archive",
                hint="log the model again (mlflow.tensorflow.log_model)",
            )
        try:
            model = keras.saving.load_model(
                str(path),
                compile=False,
                safe_mode=not options.allow_unsafe_deserialization,
                custom_objects=options.custom_objects or None,
            )
        except (TypeError, ValueError) as exc:
            raise _load_error(info.uri, exc) from None
        except Exception as exc:  # a corrupt archive surfaces as zipfile/OSError/h5py errors
            raise InputError(
                f"model `{info.uri}` could not be loaded ({path.name}): {type(exc).__name__}: {first_line(exc)}",
                hint="the artifact may be corrupt: log the model again",
            ) from None
        return cls(info, path, model)

    @property
    def model(self) -> Any:
        return self.keras_model

    @property
    def input_names(self) -> list[str]:
        return keras_input_names(self.keras_model)

    @property
    def output_names(self) -> list[str]:
        return keras_output_names(self.keras_model)

    @property
    def input_shapes(self) -> dict[str, tuple]:
        shapes = [t.shape for t in self.keras_model.inputs]
        return {n: tuple(-1 if d is None else int(d) for d in s[1:]) for n, s in zip(self.input_names, shapes)}

    def predict_batch(self, inputs, model: Any = None) -> dict[str, np.ndarray]:
        """`predict_on_batch`, the compiled step `predict` runs, without the per-call data pipeline
        that `predict` builds (seconds over a run)."""
        model = model if model is not None else self.keras_model
        feed = inputs if len(inputs) > 1 else next(iter(inputs.values()))
        return outputs_by_name(model.predict_on_batch(feed), self.output_names)

    def tf_converter(self, conversion, model: Any = None):
        """The float TFLiteConverter of this model (or of `model`, what `model` steps made of it):
        what the converter engine adds its quantization to."""
        return build_converter(conversion, keras_model=model if model is not None else self.keras_model)

    def to_float_tflite(self, conversion, model: Any, log_path: Path) -> bytes:
        return run_converter(self.tf_converter(conversion, model), log_path)

    def layer_classes(self, model: Any = None) -> frozenset[str]:
        return frozenset(type(layer).__name__ for layer in (model if model is not None else self.keras_model).layers)


def _load_error(uri: str, exc: Exception) -> InputError:
    """What a Keras loading error means for the user: code the model would run, a custom object
    no plugin registered, or another problem, each with its fix."""
    text = str(exc)
    if "safe_mode" in text or "Lambda" in text:
        return InputError(
            f"model `{uri}` contains code (a Lambda layer) that loading would execute",
            hint="replace the Lambda with a registered custom layer, or, for a model you trust, "
            "set `allow_unsafe_deserialization: true` in the manifest",
        )
    if "custom" in text.lower() or "Could not locate" in text or "Unknown layer" in text:
        names = sorted(set(re.findall(r"class[_ ]name[\"']?:? ?[\"']?([\w>.]+)", text)))[:3]
        return InputError(
            f"model `{uri}` uses a custom layer or object Keras cannot find"
            + (f" ({', '.join(names)})" if names else "")
            + f": {first_line(exc)[:200]}",
            hint="install a plugin that implements the `register_keras_objects(register)` hook and "
            "calls register('package>ClassName', TheClass)",
        )
    return InputError(f"model `{uri}` could not be loaded: {first_line(exc)}")


class SavedModelSource(ModelSource):
    """A TensorFlow SavedModel folder; the manifest's `signature:` is the model (default serving_default)."""

    name = "saved_model"
    title = "a SavedModel"
    flavors = FLAVORS
    takes_signature = True

    def __init__(self, info, path: Path, signature: str):
        super().__init__(info, path)
        self.signature = signature

    @classmethod
    def locate(cls, root: Path) -> Path | None:
        if root.is_file():
            return None
        saved = sorted(p.parent for p in root.rglob("saved_model.pb"))
        return saved[0] if saved else None

    @classmethod
    def open(cls, path: Path, info, options) -> "SavedModelSource":
        import_tensorflow()
        source = cls(info, path, options.signature)
        source._serving_fn()  # a missing signature fails here, before any work
        return source

    def _serving_fn(self):
        if "serving_fn" not in self.cache:
            signatures = import_tensorflow().saved_model.load(str(self.path)).signatures
            if self.signature not in signatures:
                raise InputError(
                    f"model `{self.info.uri}` has no signature `{self.signature}` (signatures: {', '.join(sorted(signatures))})",
                    hint="set `signature:` in the manifest to one of them",
                )
            self.cache["serving_fn"] = signatures[self.signature]
        return self.cache["serving_fn"]

    @property
    def input_names(self) -> list[str]:
        return list(self._serving_fn().structured_input_signature[1])

    @property
    def output_names(self) -> list[str]:
        return list(self._serving_fn().structured_outputs)

    @property
    def input_shapes(self) -> dict[str, tuple]:
        shapes = [spec.shape for spec in self._serving_fn().structured_input_signature[1].values()]
        return {n: tuple(-1 if d is None else int(d) for d in s[1:]) for n, s in zip(self.input_names, shapes)}

    def predict_batch(self, inputs, model: Any = None) -> dict[str, np.ndarray]:
        tf = import_tensorflow()
        out = self._serving_fn()(**{k: tf.constant(v) for k, v in inputs.items()})
        return {name: out[name].numpy() for name in self.output_names}

    def tf_converter(self, conversion, model: Any = None):
        """The float TFLiteConverter of the signature (what the converter engine quantizes with)."""
        return build_converter(conversion, saved_model_dir=self.path, signature=self.signature)

    def to_float_tflite(self, conversion, model: Any, log_path: Path) -> bytes:
        return run_converter(self.tf_converter(conversion), log_path)


@hookimpl
def register_sources(register):
    register(KerasSource)
    register(SavedModelSource)
