"""Where a run's wall time goes: a clock that adds up named phases (``report.timing``)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc; None elsewhere): the start-up cost that
    the run itself cannot time (the interpreter, imports, the CLI)."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        # both since boot: the process's start in clock ticks, and now
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def peak_rss_mb() -> float | None:
    """This process's peak resident memory in MB (None where `resource` is missing)."""
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
    except (ImportError, OSError):
        return None


class PhaseClock:
    """Seconds per phase; a phase entered twice adds up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def fields(self) -> dict[str, float]:
        """`<phase>_s` values for the report's Timing record, to the millisecond."""
        return {f"{name}_s": round(value, 3) for name, value in self.seconds.items()}
