"""How the search orders trials: pure rules on measured numbers (unit-tested without TensorFlow).

A timed metric (latency) is put on one scale first (:func:`timed_on_one_scale`). Passing trials
are ranked by the objective, most important metric first, each in its own good direction; values
within ``tie_tolerance`` (relative) count as equal, so a noisy timing does not decide alone and
the next metric does; then trial order. When nothing passes, the closest trial is
the one with the smallest gate shortfall (then trial order).
"""

from __future__ import annotations

import functools
from typing import Protocol, Sequence, TypeVar

from pipeline_stage.contract.report import TimedComparison


class Ranked(Protocol):
    index: int
    metrics: dict[str, float]
    shortfall: float
    status: str


T = TypeVar("T", bound=Ranked)


def timed_on_one_scale(
    metrics: dict[str, float], timed: Sequence[TimedComparison], stage_baseline: dict[str, float]
) -> tuple[dict[str, float], dict[str, float], dict[str, float], dict[str, float]]:
    """A trial's numbers, given the timed metrics it measured beside the baseline in its worker:
    (to rank: a timed metric as its ratio to the baseline beside it times the stage's baseline
    value, one scale for trials timed at different moments under different load; to gate: the
    pair timed side by side, candidate and baseline; and the spread the gate does not count)."""
    ranked, gated, baseline = dict(metrics), dict(metrics), dict(stage_baseline)
    for t in timed:
        gated[t.metric], baseline[t.metric] = t.candidate, t.baseline
        if t.ratio is not None and stage_baseline.get(t.metric) is not None:
            ranked[t.metric] = t.ratio * stage_baseline[t.metric]
    return ranked, gated, baseline, {t.metric: t.spread for t in timed}


def compare(a: Ranked, b: Ranked, objective: Sequence[str], higher_is_better: dict[str, bool], tie_tolerance: float) -> int:
    """-1 if `a` ranks before `b`, else 1 (never 0: trial order breaks every tie)."""
    for name in objective:
        va, vb = a.metrics.get(name), b.metrics.get(name)
        if va is None or vb is None or va == vb:
            continue
        if abs(va - vb) <= tie_tolerance * max(abs(va), abs(vb)):
            continue
        good = (va > vb) if higher_is_better[name] else (va < vb)
        return -1 if good else 1
    return -1 if a.index < b.index else 1


def gains(
    trial: Ranked,
    baseline: dict[str, float],
    names: Sequence[str],
    higher_is_better: dict[str, bool],
    tie_tolerance: float,
) -> bool:
    """Whether `trial` beats the float baseline on one of `names` by more than the tie tolerance:
    a passing model that is no smaller (or faster) than float gains nothing."""
    for name in names:
        value, base = trial.metrics.get(name), baseline.get(name)
        if value is None or base is None:
            return True  # nothing to compare with: passing is what counts
        if abs(value - base) > tie_tolerance * max(abs(value), abs(base)):
            if (value > base) if higher_is_better[name] else (value < base):
                return True
    return False


def rank(trials: Sequence[T], objective: Sequence[str], higher_is_better: dict[str, bool], tie_tolerance: float) -> list[T]:
    """`trials` best first (see the module docstring)."""
    key = functools.cmp_to_key(lambda a, b: compare(a, b, objective, higher_is_better, tie_tolerance))
    return sorted(trials, key=key)


def closest(trials: Sequence[T]) -> T | None:
    """The trial nearest to passing among those that produced a model, or None."""
    usable = [t for t in trials if t.status in ("passed", "failed")]
    return min(usable, key=lambda t: (t.shortfall, t.index)) if usable else None
