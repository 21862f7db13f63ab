"""What a step is: the contract between the runner and every optimization plugin.

A chain runs in three phases, in this order (the manifest is checked for it before any work):

``model``    Keras model in, Keras model out (pruning, QAT, BatchNorm folding, cutting outputs).
``convert``  contributes settings to the one TFLite conversion (quantization mode, calibration
             data, op sets). The chain runner converts exactly once, after the last ``convert`` step.
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
    * ``apply(subject, ctx)``: does the work. ``subject`` is a Keras model (phase ``model``), a
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
        work on a source of `source_kind` (``keras``, ``saved_model`` or ``tflite``), naming what
        would. Called at ``validate`` when the model URI shows the kind, else before the baseline."""

    def expected_cost(self) -> float:
        """Rough relative cost of this configured step (1 = a conversion); a search tries cheap chains
        first. Steps that fine-tune return more."""
        return 1.0

    def apply(self, subject: Any, ctx: "StepContext") -> Any:  # pragma: no cover - abstract
        raise NotImplementedError(f"step `{self.name}` does not implement apply()")

    def __repr__(self) -> str:
        return f"<step {self.name} {self.params.model_dump()}>"


@dataclass
class ConversionSettings:
    """Everything `convert` steps can ask of the one TFLite conversion.

    Steps fill it in; the conversion module turns it into TFLiteConverter settings. A field left
    at its default means "what the converter does by default".
    """

    quantization: str | None = None  # None (float) | dynamic | int8 | float16 | int16x8 | weight_only | qat | recipe
    engine: str = "converter"  # converter (quantize during conversion) | litert (LiteRT Quantizer on the float model)
    # engine litert: the recipe's weights and algorithm (the converter has 8-bit min-max only)
    weight_bits: int = 8  # 8 | 4
    block_size: int = 0  # 0: per channel / per tensor (per_channel); 32..256: blockwise weight scales
    algorithm: str = "min_max"  # min_max | mse | octav | gptq | hadamard
    recipe: list[dict[str, Any]] | None = None  # a LiteRT Quantizer JSON recipe, as loaded (mode `recipe`)
    inference_input_type: str = "float32"  # float32 | int8 | int16
    inference_output_type: str = "float32"
    representative_data: str | None = None  # data set name: calibration | training
    calibration_samples: int = 200
    per_channel: bool = True  # per-channel weight scales; False: one scale per tensor (smaller file)
    allow_select_tf_ops: bool = False
    allow_custom_ops: bool = False
    keep_float_ops: list[str] = field(default_factory=list)  # op types left in float (selective int8)
    keep_float_nodes: list[str] = field(default_factory=list)  # node output tensor names left in float
    keep_float_outputs: list[str] = field(default_factory=list)  # outputs whose own branch stays float
    sparsity: bool = False  # store pruned weights sparsely where the converter can
    fine_tune: dict[str, Any] = field(default_factory=dict)  # qat: epochs, batch_size, learning_rate, seed
    training_data: str | None = None  # data set name the qat fine-tuning uses
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
    model: Any = None  # for `tflite` steps: the Keras model that was converted (None for a SavedModel)
    # The one conversion's settings: `model` steps may add to them (prune asks for sparse storage),
    # `tflite` steps read how the model was converted.
    conversion: "ConversionSettings | None" = None
    source_kind: str = "keras"  # keras | saved_model | tflite: what the chain started from
    # For `tflite` steps after engine litert: the float .tflite the LiteRT Quantizer quantized
    # (per-tensor comparisons need it); None otherwise.
    float_model: bytes | None = None
