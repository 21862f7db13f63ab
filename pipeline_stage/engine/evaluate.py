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


def alternating_latencies_ms(models: dict[str, bytes], x, runs: int, rounds: int) -> dict[str, list[np.ndarray]]:
    """Per-invocation latencies of several .tflite models (batch 1, 1 thread, XNNPACK) on the same
    real sample, timed in `rounds` alternating rounds of `runs` each in this process (the order
    reversed every other round), so that load on the machine falls on all of them alike."""
    interpreters = {name: TFLiteModel(data, threads=1) for name, data in models.items()}
    for model in interpreters.values():  # warm every one before the first timed round
        model.latencies_ms(x, 1, warmup=10)
    out: dict[str, list[np.ndarray]] = {name: [] for name in models}
    order = list(models)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            out[name].append(interpreters[name].latencies_ms(x, runs, warmup=2))
    return out


def latencies_ms(model_bytes: bytes, x, runs: int) -> np.ndarray:
    """Per-invocation latencies of the .tflite (batch 1, 1 thread, XNNPACK) on a real sample, the
    first of `x` (zeros are no input: a full-int8 DIV whose divisor quantizes to the zero point
    fails at invoke)."""
    return TFLiteModel(model_bytes, threads=1).latencies_ms(x, runs)
