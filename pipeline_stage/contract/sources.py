"""Model sources: the kinds of model the stage reads, each a class a plugin registers.

A source plugin registers a :class:`ModelSource` subclass through ``register_sources(register)``.
The class recognises what a downloaded MLflow model (or a local path) holds, by the MLmodel file's
flavors (``flavors``) and by its files (:meth:`ModelSource.locate`), and opens it
(:meth:`ModelSource.open`, safely: no code from the registry runs unless the manifest allows it).
An instance is one loaded model: its inputs and outputs by name, the baseline's predictor (the
framework's own outputs, so the conversion's error is measured, not assumed) and its conversion to
a float ``.tflite``. ``model`` steps edit :attr:`ModelSource.model` where the kind has one (a
Keras model), and quantization engines that work during conversion read the source too.

The built-in kinds (``keras``, ``saved_model``, ``tflite``) are plugins written with this API.
Nothing here imports TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline_stage.contract.plugin_class import PluginClass

if TYPE_CHECKING:
    import numpy as np

    from pipeline_stage.contract.errors import InputError
    from pipeline_stage.contract.report import SourceRef
    from pipeline_stage.contract.steps import ConversionSettings


@dataclass(frozen=True)
class SourceOptions:
    """What the manifest says about loading the source."""

    # Load code the model carries (a Keras Lambda layer, a pickled module): only for trusted models.
    allow_unsafe_deserialization: bool = False
    custom_objects: dict[str, Any] = field(default_factory=dict)  # from the register_keras_objects hook
    signature: str = "serving_default"  # the manifest's `signature:` (kinds with ``takes_signature``)
    io_layout: str = "source"  # the manifest's `conversion.io_layout` (kinds with it in ``layouts``)


class ModelSource(PluginClass):
    """Base class of a model kind; plugins subclass it and register the subclass.

    Subclasses set ``name`` (the kind: what steps' ``check_source`` and engines' ``source_kinds``
    name), ``title`` (the kind in words, for messages: "a Keras model"), ``flavors`` (MLflow flavors
    whose models it may hold), ``suffixes`` (file suffixes that show the kind from a URI, so
    ``validate`` can check the chain against it), and implement :meth:`locate`, :meth:`open`, the
    input/output properties, :meth:`predict_batch` and :meth:`to_float_tflite`.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    flavors: ClassVar[tuple[str, ...]] = ()
    suffixes: ClassVar[tuple[str, ...]] = ()
    # Whether `signature:` in the manifest means something for this kind (a SavedModel's signature
    # key); for the others a `signature:` is refused naming the kind.
    takes_signature: ClassVar[bool] = False
    # The I/O layouts it can register (`conversion.io_layout`); another is refused naming the kind.
    layouts: ClassVar[tuple[str, ...]] = ("source",)
    # What gives this install what :meth:`unavailable` finds missing (a pip extra), for messages.
    install_hint: ClassVar[str] = ""
    # Whether it has a model that ``model``-phase steps edit (:attr:`model`); where it has none,
    # what to do instead, for the message that refuses them.
    editable: ClassVar[bool] = False
    edit_hint: ClassVar[str] = "drop the step, or give the Keras model (mlflow.tensorflow.log_model) it came from"

    @classmethod
    def refuse_edit(cls, step_name: str, uri: str) -> "InputError":
        """The error for a ``model``-phase step on a model of this kind, which has nothing it can edit."""
        from pipeline_stage.contract.errors import InputError

        return InputError(
            f"step `{step_name}` edits the source's model (phase model), but `{uri}` is {cls.title or cls.name}, "
            "which has none it can edit",
            hint=cls.edit_hint,
        )

    def __init__(self, info: "SourceRef", path: Path):
        self.info = info
        self.path = path  # the file or folder it was opened from (search trials reopen it)
        self.cache: dict[str, Any] = {}
        # How it was read, in words, for the report: what it had to rewrite for the engines, how
        # the model is fed, what it carried over (the .tflite source says all of these).
        self.notes: list[str] = []
        # Set by a source that holds an already quantized model: "integer" (integer activations:
        # the stage refuses to quantize it again) or "weights" (integer weights, float compute)
        self.already_quantized: str | None = None

    # -- recognising and opening ------------------------------------------------------------------
    @classmethod
    def unavailable(cls) -> str | None:
        """Why this install cannot open models of this kind (a framework it lacks), naming the fix;
        None when it can. Asked before anything is downloaded: the stage then stops at once."""
        return None

    @classmethod
    def locate(cls, root: Path) -> Path | None:
        """The file or folder under `root` (a download, or a local path that may itself be the
        model) that holds a model of this kind, or None."""
        return None

    @classmethod
    def open(cls, path: Path, info: "SourceRef", options: SourceOptions) -> "ModelSource":
        """Load the model at `path` (what :meth:`locate` returned). Raise
        :class:`~pipeline_stage.contract.errors.InputError` naming the model and the fix for a model
        that cannot be loaded, or whose loading would run code the manifest did not allow."""
        raise NotImplementedError(f"source `{cls.name}` does not implement open()")

    # -- the loaded model ---------------------------------------------------------------------------
    @property
    def model(self) -> Any:
        """The framework's model object that ``model``-phase steps edit (a Keras model), or None
        when this kind has none they can edit."""
        return None

    @property
    def input_names(self) -> list[str]:
        """The model's inputs by name (a data set names its arrays after them)."""
        raise NotImplementedError

    @property
    def output_names(self) -> list[str]:
        """The model's outputs by name (labels ``y.<output>`` and metrics ``<metric>.<output>`` use them)."""
        raise NotImplementedError

    @property
    def input_shapes(self) -> dict[str, tuple]:
        """Each input's shape without the batch axis (-1 for a dynamic dimension), as the data
        holds it (before :meth:`feed`)."""
        raise NotImplementedError

    def feed(self, inputs: dict[str, "np.ndarray"]) -> dict[str, "np.ndarray"]:
        """A data set's input arrays (as the training run logged them) as the converted model takes
        them: the same arrays unless the source converts to another layout (``io_layout``). The
        data sets apply it, so every model the stage runs, :meth:`predict_batch` included, gets
        these."""
        return inputs

    def predict_batch(self, inputs: dict[str, "np.ndarray"], model: Any = None) -> dict[str, "np.ndarray"]:
        """Every output by name for one batch of inputs by name (as :meth:`feed` gives them): the
        framework's own outputs (the baseline's reference). `model`: a version of :attr:`model`
        that ``model`` steps returned."""
        raise NotImplementedError

    def to_float_tflite(self, conversion: "ConversionSettings", model: Any, log_path: Path) -> bytes:
        """The float ``.tflite`` of this model (or of `model`, what ``model`` steps made of it),
        with what `conversion` asks of every conversion (I/O types, op sets, hints); the
        converter's own output goes to `log_path`."""
        raise NotImplementedError

    def for_engines(self, float_tflite: bytes) -> bytes:
        """The float ``.tflite`` a quantization engine reads, made from `float_tflite` (this
        source's float conversion); the same bytes unless the kind's files may be written in ways
        engines cannot read (the ``.tflite`` source rewrites those, exactly, and says so in
        :attr:`notes`)."""
        return float_tflite

    def carry_over(self, converted: bytes) -> bytes:
        """`converted` (the chain's conversion of this model) with what the source's own files hold
        beside the graph and a user wants kept (the ``.tflite`` source: TFLite metadata and
        associated files); the same bytes by default."""
        return converted

    def layer_classes(self, model: Any = None) -> frozenset[str]:
        """The model's layer classes, for search moves that only apply to some (empty: unknown)."""
        return frozenset()
