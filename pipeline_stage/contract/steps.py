"""What a step is: the contract between the runner and every optimization plugin.

A chain runs in three phases, in this order (the manifest is checked for it before any work):

``model``    the source's model in, the same kind out (a Keras model: pruning, BatchNorm folding,
             cutting outputs), for sources that have one (:attr:`ModelSource.model`).
``convert``  contributes settings to the one conversion (a quantization engine and its settings,
             I/O types, op sets). The chain runner converts exactly once, after the last ``convert``
             step: the source plugin converts to float, or the requested engine quantizes.
``tflite``   flatbuffer bytes in, flatbuffer bytes out, or analysis (metadata, op lists, plans).

Nothing here imports TensorFlow: ``validate``, ``plugins`` and ``schema`` stay fast.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict

from pipeline_stage.contract.plugin_class import PluginClass

if TYPE_CHECKING:
    from pipeline_stage.contract.data import Dataset


class Phase(str, enum.Enum):
    MODEL = "model"
    CONVERT = "convert"
    TFLITE = "tflite"

    @property
    def order(self) -> int:
        return list(Phase).index(self)


class Params(BaseModel):
    """Base for step params: unknown keys are errors, so typos never pass silently.

    ``digest_since`` names the fields added after the step's first release: they count in the
    chain digest only when set to other than their default, so a chain written before they existed
    keeps its digest (the registry's reuse of a passing version depends on it). A subclass whose
    digest must say more (the content of a file a param names, say) overrides :meth:`digest_view`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    digest_since: ClassVar[frozenset[str]] = frozenset()

    def digest_view(self) -> dict[str, Any]:
        """The params as the chain digest counts them: every field with its default filled in,
        except a ``digest_since`` field left at its default."""
        data = self.model_dump(mode="json")
        for name in self.digest_since:
            if getattr(self, name) == type(self).model_fields[name].get_default(call_default_factory=True):
                data.pop(name, None)
        return data


class Step(PluginClass):
    """Base class for a chain step; plugins subclass it and register the subclass.

    Subclasses set:

    * ``name``: the key a manifest's ``chain`` uses; unique across installed plugins.
    * ``phase``: a :class:`Phase`.
    * ``Params``: a :class:`Params` subclass (fields typed, with defaults and ``description``).
    * ``apply(subject, ctx)``: does the work. ``subject`` is the source's model (phase ``model``), a
      :class:`ConversionSettings` to change in place (phase ``convert``), or the ``.tflite``
      bytes (phase ``tflite``); ``apply`` returns the new subject (``convert`` steps return None).

    Optionally ``required_data()`` names the data sets the configured step needs
    (``calibration``, ``evaluation``, ``training``), checked before any heavy work.
    """

    name: ClassVar[str] = ""
    phase: ClassVar[Phase]
    Params: ClassVar[type[Params]] = Params

    def __init__(self, params: Params | None = None):
        self.params = params if params is not None else self.Params()

    def required_data(self) -> set[str]:
        """Data sets this configured step needs; the manifest must provide them."""
        return set()

    @classmethod
    def support_table(cls) -> list[dict[str, str]]:
        """Rows of what the step supports (the quantize step's mode x engine x source kind), shown
        under it by ``pipeline-stage plugins``; [] for none."""
        return []

    def check_source(self, source_kind: str) -> None:
        """Raise :class:`~pipeline_stage.contract.errors.InputError` when this configured step cannot
        work on a source of `source_kind` (a source plugin's name: ``keras``, ``saved_model``,
        ``tflite``...), naming what would. Called at ``validate`` when the model URI shows the kind,
        else before the baseline."""

    def check_plugins(self, installed: Any) -> None:
        """Raise :class:`~pipeline_stage.contract.errors.InputError` when this configured step names
        something the installed plugins do not provide (``quantize`` checks its ``engine``).
        `installed` has ``steps``, ``engines`` and ``sources`` by name (each with ``cls``). Called
        when the manifest is validated."""

    def expected_cost(self) -> float:
        """Rough relative cost of this configured step (1 = a conversion); a search tries cheap chains
        first. Steps that fine-tune return more."""
        return 1.0

    def apply(self, subject: Any, ctx: "StepContext") -> Any:  # pragma: no cover - abstract
        raise NotImplementedError(f"step `{self.name}` does not implement apply()")

    def __repr__(self) -> str:
        return f"<step {self.name} {self.params.model_dump()}>"


@dataclass
class QuantizationRequest:
    """What a ``convert`` step asks of a quantization engine (:mod:`pipeline_stage.contract.engines`):
    the engine by its registered name, the engine's own settings (opaque to the stage: the
    ``quantize`` step passes its params), and the data sets it calibrates or fine-tunes on."""

    engine: str
    settings: Any
    mode: str  # in words, for progress lines and the report: int8, dynamic, weight_only, qat, recipe...
    calibration_data: str | None = None  # data set name: calibration | training
    calibration_samples: int = 200
    training_data: str | None = None  # data set name a fine-tuning engine trains on

    def record(self) -> dict[str, Any]:
        """The request as the report shows it."""
        settings = self.settings.model_dump(mode="json") if hasattr(self.settings, "model_dump") else self.settings
        return {
            "quantization": self.mode,
            "engine": self.engine,
            "engine_settings": settings,
            "calibration_data": self.calibration_data,
            "calibration_samples": self.calibration_samples if self.calibration_data else None,
            "training_data": self.training_data,
        }


@dataclass
class ConversionSettings:
    """What every conversion of a chain's model to a ``.tflite`` takes, as ``convert`` steps set it.

    The stage converts the model to float once (the source plugin does it), or hands it to the
    quantization engine ``quantization`` names. Only what any conversion needs is here: the I/O
    types, the op sets, and ``hints`` (what a step asks of whoever converts: ``prune`` asks for
    ``sparse_weights``; a source or an engine reads the hints it knows and ignores the others).
    """

    quantization: QuantizationRequest | None = None
    inference_input_type: str = "float32"  # float32 | int8 | int16
    inference_output_type: str = "float32"
    allow_select_tf_ops: bool = False
    allow_custom_ops: bool = False
    hints: dict[str, Any] = field(default_factory=dict)
    set_by: dict[str, str] = field(default_factory=dict)  # setting -> step that set it

    def claim(self, setting: str, step_name: str) -> None:
        """Record that `step_name` sets `setting`; two steps setting it is a manifest error."""
        from pipeline_stage.contract.errors import InputError

        other = self.set_by.get(setting)
        if other and other != step_name:
            raise InputError(
                f"steps `{other}` and `{step_name}` both set the conversion's `{setting}`",
                hint="keep one of them in the chain",
            )
        self.set_by[setting] = step_name

    def float_part(self) -> "ConversionSettings":
        """The float conversion these settings build on: no quantization, float I/O, the same op
        sets and hints (what an engine that quantizes a float .tflite starts from)."""
        return ConversionSettings(
            allow_select_tf_ops=self.allow_select_tf_ops, allow_custom_ops=self.allow_custom_ops, hints=dict(self.hints)
        )

    def record(self) -> dict[str, Any]:
        """The settings as the report shows them."""
        out: dict[str, Any] = {"quantization": None}
        if self.quantization is not None:
            out.update(self.quantization.record())
        out.update(
            inference_input_type=self.inference_input_type,
            inference_output_type=self.inference_output_type,
            allow_select_tf_ops=self.allow_select_tf_ops,
            allow_custom_ops=self.allow_custom_ops,
            hints=dict(self.hints),
        )
        return out


@dataclass
class StepContext:
    """What a step may use while it runs: data, a work directory, and places to report to."""

    workdir: Any  # pathlib.Path
    load_data: Callable[[str], "Dataset"]
    notes: dict[str, Any] = field(default_factory=dict)  # shown in the report, per step
    tags: dict[str, str] = field(default_factory=dict)  # added to the registered version
    artifacts: dict[str, Any] = field(default_factory=dict)  # name -> path, logged to the run
    log: Callable[[str], None] = print
    # Real input samples (the evaluation data, else calibration or training data) to run or time
    # the model on; never zeros or random arrays, which a quantized model may not survive.
    samples: "Callable[[], Any] | None" = None
    # For `tflite` steps: the framework model that was converted (a Keras model after `model`
    # steps), or None for a kind that has none steps edit (a SavedModel, a .tflite).
    model: Any = None
    # The one conversion's settings: `model` steps may add hints (prune asks for sparse weights),
    # `tflite` steps read how the model was converted.
    conversion: "ConversionSettings | None" = None
    source_kind: str = "keras"  # the source plugin's kind: keras | saved_model | tflite | ...
    # For `tflite` steps after an engine that quantized a float .tflite: that float model (per-tensor
    # comparisons need it); None otherwise.
    float_model: bytes | None = None
    # For `tflite` steps after a quantization: the engine's per-layer error of a quantized model,
    # `per_layer_errors(model_bytes, samples)` (rows worst first, or why there are none).
    per_layer_errors: "Callable[[bytes, int], list[dict] | str] | None" = None
