"""Benchmark: memory of a search. `pipeline-stage run` with a `candidates` search of 4 and of 12
trials (full int8 conversions that differ in their calibration sample count, none skipped), as its
own process against a local store; prints the peak RSS of the whole process tree (wait4: the stage
and its search workers) and of the stage's own process (report.json `timing.peak_rss_mb`), so a
parent that grew with the trials would show.

    .venv/bin/python bench/bench_search_memory.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    from bench.bench_stage import timed_process
    from pipeline_stage.demo import digits_data, train_digits_cnn

    tmp = Path(tempfile.mkdtemp(prefix="bench-search-memory-"))
    data = digits_data()
    train_digits_cnn(data).save(tmp / "model.keras")
    np.savez(tmp / "calib.npz", x=data.calibration[0])
    np.savez(tmp / "eval.npz", x=data.evaluation[0], y=data.evaluation[1])
    exe = str(Path(sys.executable).with_name("pipeline-stage"))
    print("| trials | wall (s) | peak RSS, stage + workers (MB) | peak RSS, the stage's own process (MB) |")
    print("| ---: | ---: | ---: | ---: |")
    for trials in (4, 12):
        candidates = "".join(
            f"    - [{{quantize: {{mode: int8, calibration_samples: {40 + 10 * k}}}}}]\n" for k in range(trials - 1)
        )
        manifest = tmp / f"m{trials}.yaml"
        manifest.write_text(
            f"model: {tmp / 'model.keras'}\ndata: {{calibration: {tmp / 'calib.npz'}, evaluation: {tmp / 'eval.npz'}}}\n"
            "chain:\n  - quantize: {mode: int8, calibration_samples: 30}\nevaluation: {per_step: []}\n"
            "gates:\n  - {metric: accuracy, max_drop: 0.05}\n"
            f"search:\n  strategy: candidates\n  budget: {{trials: {trials}}}\n  parallel: 2\n  candidates:\n{candidates}"
        )
        report = tmp / f"r{trials}.json"
        wall, tree_rss, _ = timed_process(
            [exe, "run", str(manifest), "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "-q", "--report", str(report)], tmp
        )
        found = json.loads(report.read_text())
        assert len(found["search"]["trials"]) == trials, found["search"]["trials"]
        print(f"| {trials} | {wall:.1f} | {tree_rss:.0f} | {found['timing']['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
