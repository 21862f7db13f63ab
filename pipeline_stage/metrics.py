"""The metric contract. Built-in metrics live in ``pipeline_stage_plugins.metrics``."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from pipeline_stage.evaluate import Evaluation


class Metric:
    """Base class for an evaluation metric; subclass and register it with ``register_metrics``.

    * ``name``: what gates and ``evaluation.metrics`` use.
    * ``higher_is_better``: gates' ``max_drop`` and ``max_relative_drop`` measure a drop in this
      direction (an increase for lower-is-better metrics).
    * ``needs_labels``: the metric needs the evaluation data's ``y``.
    * ``runs_model``: computing it invokes the model (False for size-like metrics).
    * ``uses``: ``predictions`` (computable on the Keras model too, so also after ``model``-phase
      steps) or ``flatbuffer`` (needs the .tflite: size, latency).
    * ``compute(evaluation)``: the value for one model (baseline or candidate).
    """

    name: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    needs_labels: ClassVar[bool] = False
    uses: ClassVar[str] = "predictions"
    runs_model: ClassVar[bool] = True
    unit: ClassVar[str] = ""

    def compute(self, evaluation: "Evaluation") -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""
