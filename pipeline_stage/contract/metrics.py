"""The metric contract: what a metric computes on. Built-in metrics live in ``pipeline_stage_plugins.metrics``."""

from __future__ import annotations

import time
from functools import cached_property
from typing import Callable, ClassVar

import numpy as np

from pipeline_stage.contract.errors import InputError
from pipeline_stage.contract.plugin_class import PluginClass

Outputs = dict[str, np.ndarray]


class Evaluation:
    """One model under measurement, as metrics see it: lazily computed predictions, labels, the
    baseline's outputs on the same inputs (``reference``), the .tflite bytes and latencies (timed on
    a real input sample). Metrics read what they need; nothing is computed that no metric asked
    for. The runner supplies how to predict, how to time the model, and the reference.

    A model has named outputs: ``predictions``, ``labels`` and ``reference`` are those of the first
    (for a single-output model, the only) output; ``outputs``, ``labels_by_output`` and ``references``
    hold every output by name, and ``for_output(name)`` is the evaluation of one output, which is how
    the stage computes ``<metric>.<output>``.
    """

    def __init__(
        self,
        *,
        model_bytes: bytes,
        x,
        labels,
        predict: Callable,
        latencies: Callable[[], np.ndarray],
        reference: Callable | None = None,
        latency_runs: int = 100,
        output_names: list[str] | None = None,
    ):
        self.model_bytes = model_bytes
        self.x = x  # the inputs: an array for the only input, or arrays by input name
        self.output_names = list(output_names or ["output"])
        self.labels_by_output: Outputs = (
            labels if isinstance(labels, dict) else ({} if labels is None else {self.output_names[0]: labels})
        )
        self.labels = self.labels_by_output.get(self.output_names[0])
        self._predict = predict
        self._latencies = latencies
        self._reference = reference
        self.latency_runs = latency_runs
        self.seconds: dict[str, float] = {}

    def _named(self, out) -> Outputs:
        return out if isinstance(out, dict) else {self.output_names[0]: out}

    @cached_property
    def outputs(self) -> Outputs:
        if self.x is None:
            raise InputError(
                "a metric needs predictions but no `evaluation` data was given",
                hint="add `data: {evaluation: <URI>}` to the manifest",
            )
        start = time.perf_counter()
        out = self._named(self._predict(self.x))
        self.seconds["predict"] = time.perf_counter() - start
        return out

    @property
    def predictions(self) -> np.ndarray:
        return self.outputs[self.output_names[0]]

    @cached_property
    def references(self) -> Outputs:
        """The baseline's outputs on the same inputs (the source model's), by output name: what
        fidelity metrics compare the candidate with, no labels needed."""
        if self.x is None or self._reference is None:
            raise InputError(
                "a fidelity metric compares outputs on the evaluation data, but no `evaluation` data was given",
                hint="add `data: {evaluation: <URI of an .npz with x>}` (labels are not needed)",
            )
        return {k: np.asarray(v) for k, v in self._named(self._reference()).items()}

    @property
    def reference(self) -> np.ndarray:
        return self.references[self.output_names[0]]

    @cached_property
    def latencies_ms(self) -> np.ndarray:
        start = time.perf_counter()
        out = self._latencies()
        self.seconds["latency"] = time.perf_counter() - start
        return out

    def for_output(self, name: str) -> "Evaluation":
        """The same evaluation, restricted to one output (predictions computed once, shared)."""
        return Evaluation(
            model_bytes=self.model_bytes,
            x=self.x,
            labels=self.labels_by_output.get(name),
            predict=lambda _: self.outputs[name],
            latencies=lambda: self.latencies_ms,
            reference=(lambda: self.references[name]) if self._reference is not None else None,
            latency_runs=self.latency_runs,
            output_names=[name],
        )


class Metric(PluginClass):
    """Base class for an evaluation metric; subclass and register it with ``register_metrics``.

    * ``name``: what gates and ``evaluation.metrics`` use.
    * ``higher_is_better``: gates' ``max_drop`` and ``max_relative_drop`` measure a drop in this
      direction (an increase for lower-is-better metrics).
    * ``needs_labels``: the metric needs the evaluation data's labels (``y``, or ``y.<output>``).
    * A metric computed on predictions is also computed per output, as ``<metric>.<output>``; on a
      model with several outputs the plain name is the worst output's value (outputs it does not
      apply to, where ``compute`` raises ``ValueError``, are left out).
    * ``runs_model``: computing it invokes the model (False for size-like metrics).
    * ``uses``: ``predictions`` (computable on the Keras model too, so also after ``model``-phase
      steps) or ``flatbuffer`` (needs the .tflite: size, latency).
    * ``timed``: computed from ``evaluation.latencies_ms``; the stage then times the baseline and the
      candidate in alternating rounds in one process, reports both medians and the spread of their
      difference across rounds, and a gate on it fails only by more than that spread.
    * ``compute(evaluation)``: the value for one model (baseline or candidate).
    """

    name: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    needs_labels: ClassVar[bool] = False
    uses: ClassVar[str] = "predictions"
    runs_model: ClassVar[bool] = True
    timed: ClassVar[bool] = False
    unit: ClassVar[str] = ""

    def compute(self, evaluation: Evaluation) -> float:  # pragma: no cover - abstract
        raise NotImplementedError
