"""Reliability figures of the last test run, printed at the end of the session (and written to
build/reliability-figures.json): bad inputs tried, faults injected and survived, concurrent runs,
versions lost, wrong promotions."""

from __future__ import annotations

FIGURES: dict[str, float] = {}


def add(key: str, n: int = 1) -> None:
    FIGURES[key] = FIGURES.get(key, 0) + n


def peak(key: str, value: float) -> None:
    """Keep the largest `value` seen for `key` (seconds from an outage to the exit, say)."""
    FIGURES[key] = round(max(FIGURES.get(key, 0.0), value), 1)
