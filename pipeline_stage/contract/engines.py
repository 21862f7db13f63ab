"""Quantization engines: what turns a model into a quantized ``.tflite``, each a class a plugin registers.

A ``convert`` step (the built-in ``quantize``) asks for quantization by putting a
:class:`~pipeline_stage.contract.steps.QuantizationRequest` on the conversion's settings: an engine
by name and the engine's own settings. The chain runner then hands the engine a
:class:`QuantizationJob` instead of converting to float, and the engine returns the quantized
flatbuffer. An engine either quantizes while the source converts (the TFLite converter: it needs
the source's framework, ``source_kinds``) or quantizes the float ``.tflite`` (the LiteRT Quantizer:
any source; :meth:`QuantizationJob.float_model` converts it once).

An engine owns its options (``Params``, validated from ``quantize: {engine: <name>, options: {...}}``),
the modes it offers, its per-layer error (:meth:`QuantizationEngine.per_layer_errors`, which the
``analyze`` step reports and the search's refine moves rank by) and its code. The built-in engines
(``converter``, ``litert``) are registered by the ``quantize`` plugin with the same API.
Nothing here imports TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from pipeline_stage.contract.plugin_class import PluginClass
from pipeline_stage.contract.steps import Params

if TYPE_CHECKING:
    from pipeline_stage.contract.data import Dataset
    from pipeline_stage.contract.sources import ModelSource
    from pipeline_stage.contract.steps import ConversionSettings, QuantizationRequest


@dataclass
class QuantizationJob:
    """One quantization, as the chain runner hands it to an engine."""

    request: "QuantizationRequest"
    conversion: "ConversionSettings"  # the whole conversion: I/O types, op sets, hints, the request
    source: "ModelSource"  # the loaded source model
    model: Any  # what `model` steps made of `source.model` (the source's own when none ran), or None
    load_data: Callable[[str], "Dataset"]  # the manifest's data sets by name
    workdir: Path
    log_path: Path  # where the engine's own console output goes (kept beside the run)
    log: Callable[[str], None]  # progress lines of long work
    convert_float: Callable[[], bytes]  # the float .tflite of `model` (cached by the runner)
    notes: dict = field(default_factory=dict)  # what the engine says of this job: the report shows them under the step

    def float_model(self) -> bytes:
        """The float ``.tflite`` this job's model converts to (the baseline's when nothing changed it),
        as engines can read it (the source rewrote what needed it: a SignatureDef, float32 weights)."""
        return self.convert_float()

    def calibration(self) -> "Dataset | None":
        """The request's calibration data set, its first ``calibration_samples`` samples, or None."""
        name = self.request.calibration_data
        return self.load_data(name).take(self.request.calibration_samples) if name else None


class QuantizationEngine(PluginClass):
    """Base class of a quantization engine; plugins subclass it and register the subclass.

    Subclasses set ``name`` (what ``quantize: {engine: ...}`` names; unique), ``modes`` (the modes
    it offers, as ``quantize``'s ``mode`` names them), ``source_kinds`` (the source kinds it can
    take; empty: any, because it works on the float ``.tflite``), optionally ``Params`` (its
    options), and implement :meth:`quantize`.
    """

    name: ClassVar[str] = ""
    modes: ClassVar[tuple[str, ...]] = ()
    source_kinds: ClassVar[tuple[str, ...]] = ()
    Params: ClassVar[type[Params]] = Params

    def accepts(self, source_kind: str) -> bool:
        """Whether this engine can quantize a source of `source_kind`."""
        return not self.source_kinds or source_kind in self.source_kinds

    def quantize(self, job: QuantizationJob) -> bytes:
        """The quantized ``.tflite``. Raise :class:`~pipeline_stage.contract.errors.InputError` for
        settings or a model this engine cannot take (naming the fix); the stage turns any other
        exception into a :class:`~pipeline_stage.contract.errors.PluginError` naming the engine."""
        raise NotImplementedError(f"engine `{self.name}` does not implement quantize()")

    def per_layer_errors(self, job: QuantizationJob, quantized: bytes, data: "Dataset", samples: int) -> list[dict] | str:
        """The error each op adds, worst first: rows with ``op``, ``tensor`` (its output tensor's
        name, what ``keep_float_nodes`` takes) and ``rmse/scale``; or a sentence saying why there is
        none for this job (the ``analyze`` step reports either)."""
        return f"engine `{self.name}` reports no per-layer error"
