"""The metric contract: what a metric computes on. Built-in metrics live in ``pipeline_stage_plugins.metrics``."""

from __future__ import annotations

import time
from functools import cached_property
from typing import Callable, ClassVar

import numpy as np

from pipeline_stage.contract.errors import InputError


class Evaluation:
    """One model under measurement, as metrics see it: lazily computed predictions, labels, the
    baseline's outputs on the same inputs (``reference``), the .tflite bytes and latencies (timed on
    a real input sample). Metrics read what they need; nothing is computed that no metric asked
    for. The runner supplies how to predict, how to time the model, and the reference."""

    def __init__(
        self,
        *,
        model_bytes: bytes,
        x: np.ndarray | None,
        labels: np.ndarray | None,
        predict: Callable[[np.ndarray], np.ndarray],
        latencies: Callable[[], np.ndarray],
        reference: Callable[[], np.ndarray] | None = None,
        latency_runs: int = 100,
    ):
        self.model_bytes = model_bytes
        self.x = x
        self.labels = labels
        self._predict = predict
        self._latencies = latencies
        self._reference = reference
        self.latency_runs = latency_runs
        self.seconds: dict[str, float] = {}

    @cached_property
    def predictions(self) -> np.ndarray:
        if self.x is None:
            raise InputError(
                "a metric needs predictions but no `evaluation` data was given",
                hint="add `data: {evaluation: <URI>}` to the manifest",
            )
        start = time.perf_counter()
        out = self._predict(self.x)
        self.seconds["predict"] = time.perf_counter() - start
        return out

    @cached_property
    def reference(self) -> np.ndarray:
        """The baseline's outputs on the same inputs (the source model's): what fidelity metrics
        compare the candidate with, no labels needed."""
        if self.x is None or self._reference is None:
            raise InputError(
                "a fidelity metric compares outputs on the evaluation data, but no `evaluation` data was given",
                hint="add `data: {evaluation: <URI of an .npz with x>}` (labels are not needed)",
            )
        return np.asarray(self._reference())

    @cached_property
    def latencies_ms(self) -> np.ndarray:
        start = time.perf_counter()
        out = self._latencies()
        self.seconds["latency"] = time.perf_counter() - start
        return out


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

    def compute(self, evaluation: Evaluation) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""
