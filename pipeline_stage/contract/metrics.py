"""The metric contract: what a metric computes on. Built-in metrics live in ``pipeline_stage_plugins.metrics``."""

from __future__ import annotations

import time
from functools import cached_property
from typing import Callable, ClassVar, Iterator

import numpy as np

from pipeline_stage.contract.data import CHUNK_BYTES, release_pages
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

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator["Evaluation"]:
        """The same evaluation a block of samples at a time: predictions, labels and references
        sliced to the block (a memory-mapped array reads only those rows, and hands them back
        after), about `chunk_bytes` of predictions per block. References are read only by a metric
        that asks for them."""
        outputs = self.outputs
        n = len(next(iter(outputs.values()))) if outputs else 0
        per_sample = sum(v[:1].nbytes for v in outputs.values()) or 1
        rows = max(1, chunk_bytes // per_sample)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            yield Evaluation(
                model_bytes=self.model_bytes,
                x=self.x,
                labels={k: v[start:stop] for k, v in self.labels_by_output.items()},
                predict=lambda _x, a=start, b=stop: {k: v[a:b] for k, v in outputs.items()},
                latencies=self._latencies,
                reference=(lambda a=start, b=stop: {k: v[a:b] for k, v in self.references.items()})
                if self._reference is not None
                else None,
                latency_runs=self.latency_runs,
                output_names=self.output_names,
            )
            release_pages([*outputs.values(), *self.labels_by_output.values()])
            if self._reference is not None and "references" in self.__dict__:
                release_pages(self.references.values())

    @property
    def held_bytes(self) -> int:
        """What a metric that reads whole arrays would hold: the predictions, the references
        (when already computed) and the labels."""
        arrays = [*self.outputs.values(), *self.labels_by_output.values()]
        if "references" in self.__dict__:
            arrays += list(self.references.values())
        return int(sum(a.nbytes for a in arrays))

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
    * ``compute(evaluation)``: the value for one model (baseline or candidate), from whole arrays.
    * or ``update(state, chunk)`` and ``result(state)``: the value accumulated over the evaluation
      data a block of samples at a time (``chunk`` is an :class:`Evaluation` of those samples;
      ``state`` a dict the metric keeps its sums in, float64). Such a metric never needs the whole
      set, so it works on evaluation data of any size; ``compute`` then runs them over
      ``evaluation.chunks()``. A metric that implements only ``compute`` reads whole arrays: fine
      on data that fits in memory; where the outputs of a streamed data set would not (more than
      half the memory available), the stage refuses it by name (exit 2) rather than be killed.
    """

    name: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    needs_labels: ClassVar[bool] = False
    uses: ClassVar[str] = "predictions"
    runs_model: ClassVar[bool] = True
    timed: ClassVar[bool] = False
    unit: ClassVar[str] = ""

    @classmethod
    def accumulates(cls) -> bool:
        """Whether the metric is computed a block of samples at a time (it implements ``update``)."""
        return cls.update is not Metric.update

    def compute(self, evaluation: Evaluation) -> float:
        if not type(self).accumulates():  # pragma: no cover - a metric implements one of the two
            raise NotImplementedError
        state: dict = {}
        for chunk in evaluation.chunks():
            self.update(state, chunk)
        return float(self.result(state))

    def update(self, state: dict, chunk: Evaluation) -> None:  # pragma: no cover - optional
        raise NotImplementedError

    def result(self, state: dict) -> float:  # pragma: no cover - optional
        raise NotImplementedError
