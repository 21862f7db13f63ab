"""Reliability figures of the last test run, printed at the end of the session (and written to
build/reliability-figures.json): bad inputs tried, faults injected and survived, concurrent runs,
versions lost, wrong promotions."""

from __future__ import annotations

FIGURES: dict[str, int] = {}


def add(key: str, n: int = 1) -> None:
    FIGURES[key] = FIGURES.get(key, 0) + n
