"""Long-lived worker processes for search trials (``python -m pipeline_stage.run.trial --serve``).

A fresh process per trial re-imports TensorFlow every time (seconds per trial); a worker imports it
once and runs several trials. The stage starts the workers as its run starts, so the imports
overlap with downloading and the baseline. A worker is replaced after ``trials_per_worker``
trials (the TFLite converter leaks memory on every call), and when it dies or runs past the time
budget; only the trial it was running fails, with the reason. The stage's own process runs no
conversion for a search, so it does not grow with the number of trials.
"""

from __future__ import annotations

import os
import queue
import select
import subprocess
import sys
import time
from pathlib import Path


class _Worker:
    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline_stage.run.trial", "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # each trial's output goes to its own trial.log
            env=env,
            text=True,
            bufsize=1,
        )
        self.trials = 0

    def run(self, folder: Path, timeout: float) -> str | None:
        """Run one trial; None when the worker answered (result.json says how it went), else why not."""
        try:
            self.proc.stdin.write(f"{folder}\n")
            self.proc.stdin.flush()
        except OSError:
            return "the trial's worker process died (see trial.log)"
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop(kill=True)
                return "ran past the search's time budget"
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if not ready:
                continue
            line = self.proc.stdout.readline()
            if not line:  # EOF: the worker died (a crash in a native library, the OOM killer)
                self.stop(kill=True)
                return f"the trial's worker process died (exit {self.proc.returncode}; see trial.log)"
            if line.strip() == "done":
                self.trials += 1
                return None
            # "ready" (imports done) or stray output: keep waiting for this trial's answer

    def stop(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                try:
                    self.proc.stdin.close()  # the worker's loop ends at EOF
                    self.proc.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    self.proc.kill()
        self.proc.wait()


class TrialWorkers:
    """`size` workers; `run(folder, timeout)` runs one trial folder on an idle one (thread-safe)."""

    def __init__(self, size: int, *, seed: int, trials_per_worker: int):
        self.limit = trials_per_worker
        self.env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONHASHSEED": str(seed)}
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        for _ in range(size):
            self._idle.put(self._spawn())

    def _spawn(self) -> _Worker:
        worker = _Worker(self.env)
        self._all.append(worker)
        return worker

    def run(self, folder: Path, timeout: float) -> str | None:
        """Run the trial in `folder`; None when it ran (its result.json says how), else why it did not."""
        worker = self._idle.get()
        try:
            why = worker.run(folder, timeout)
        finally:
            if worker.proc.poll() is not None or worker.trials >= self.limit:
                worker.stop()
                worker = self._spawn()  # started now, so its imports overlap with the other trials
            self._idle.put(worker)
        return why

    def close(self) -> None:
        for worker in self._all:
            worker.stop()


def parallel_trials(spec) -> int:
    """How many trials run at once: `search.parallel`, else the machine's cores."""
    return spec.parallel or os.cpu_count() or 1


def start_workers(spec) -> TrialWorkers:
    """The search's worker processes, started as the run starts (their imports overlap with it)."""
    return TrialWorkers(parallel_trials(spec), seed=spec.seed, trials_per_worker=spec.trials_per_worker)
