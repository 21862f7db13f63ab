"""Running models and measuring them: the LiteRT interpreter, batched evaluation and latency."""

from __future__ import annotations

import os
import time
from functools import cached_property
from typing import Callable

import numpy as np

from pipeline_stage.errors import InputError
from pipeline_stage.litert_runtime import TFLiteModel


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def check_input_shape(name: str, x: np.ndarray, model_shape: tuple) -> None:
    """Raise InputError when a data set does not fit the model's input."""
    got = tuple(x.shape[1:])
    fits = len(got) == len(model_shape) and all(m in (-1, None) or m == g for m, g in zip(model_shape, got))
    if not fits:
        want = tuple("?" if m in (-1, None) else m for m in model_shape)
        raise InputError(
            f"`{name}` data has samples of shape {got}, but the model takes {want}",
            hint="export the data with the same preprocessing the model was trained with",
        )


class Evaluation:
    """One model under measurement: lazily computed predictions, labels, bytes and latencies.

    Metrics read what they need; nothing is computed that no metric asked for.
    """

    def __init__(self, *, model_bytes: bytes, x: np.ndarray | None, labels: np.ndarray | None,
                 predict: Callable[[np.ndarray], np.ndarray], latency_runs: int = 100):
        self.model_bytes = model_bytes
        self.x = x
        self.labels = labels
        self._predict = predict
        self.latency_runs = latency_runs
        self.seconds: dict[str, float] = {}

    @cached_property
    def predictions(self) -> np.ndarray:
        if self.x is None:
            raise InputError("a metric needs predictions but no `evaluation` data was given",
                             hint="add `data: {evaluation: <URI>}` to the manifest")
        start = time.perf_counter()
        out = self._predict(self.x)
        self.seconds["predict"] = time.perf_counter() - start
        return out

    @cached_property
    def latencies_ms(self) -> np.ndarray:
        sample = self.x[:1] if self.x is not None else None
        model = TFLiteModel(self.model_bytes, threads=1)
        if sample is None:
            sample = np.zeros((1, *[d if d > 0 else 1 for d in model.input_shape]), dtype=np.float32)
        start = time.perf_counter()
        out = model.latencies_ms(sample.astype(np.float32), self.latency_runs)
        self.seconds["latency"] = time.perf_counter() - start
        return out
