"""Measuring with the LiteRT interpreter: input checks, thread count, latency."""

from __future__ import annotations

import os

import numpy as np

from pipeline_stage.contract.errors import InputError
from pipeline_stage.engine.litert_runtime import TFLiteModel


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


def latencies_ms(model_bytes: bytes, x, runs: int) -> np.ndarray:
    """Per-invocation latencies of the .tflite (batch 1, 1 thread, XNNPACK) on a real sample, the
    first of `x` (zeros are no input: a full-int8 DIV whose divisor quantizes to the zero point
    fails at invoke)."""
    return TFLiteModel(model_bytes, threads=1).latencies_ms(x, runs)
