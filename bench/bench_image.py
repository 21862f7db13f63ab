"""Benchmark: one `pipeline-stage run` in the image, as a Kubeflow pod runs it, with and without the
image's precompiled bytecode; the same run on the host for reference.

The image runs with PYTHONDONTWRITEBYTECODE, so a run in it without shipped .pyc files compiles
every module it imports from source, every time. `PYTHONPYCACHEPREFIX` pointed at an empty folder
makes Python look for bytecode there only: the same image, as it ran before it shipped .pyc files.
Full int8 on the demo's digits CNN against a real `mlflow server` on loopback, alternating rounds
(the first dropped). Prints wall time (median), the report's phases, the image's size as built and
`--help` in the container.

    scripts/build-image.sh localhost/pipeline-stage:test
    .venv/bin/python bench/bench_image.py [--image localhost/pipeline-stage:test] [--repeats 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PHASES = ("startup", "resolve", "load", "baseline", "chain", "evaluate", "register", "reports")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", default="localhost/pipeline-stage:test")
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()

    from bench.bench_stage import prepare
    from pipeline_stage.demo import digits_data, train_digits_cnn
    from tests.services import start_mlflow_server, stop_server

    env = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(REPO / "scripts" / "containers.conf"))}
    tmp = Path(tempfile.mkdtemp(prefix="bench-image-"))
    server, uri = start_mlflow_server(tmp / "server")
    data = digits_data()
    folder = prepare(tmp, "digits", train_digits_cnn(data), data.calibration[0], *data.evaluation)
    for path in [tmp, *tmp.rglob("*")]:
        path.chmod(0o777)  # the image's user (uid 1000) reads the model and writes the report

    def stage(report: str) -> list[str]:  # a report per side: the host's root-owned files are not the container's to replace
        return ["run", "m.yaml", "--tracking-uri", uri, "-q", "--new-version", "--report", report]

    container = ["podman", "run", "--rm", "--network", "host", "-v", f"{tmp}:{tmp}", "-w", str(folder)]
    sides = {
        "host (.venv)": [str(Path(sys.executable).with_name("pipeline-stage")), *stage("host.json")],
        "image": [*container, args.image, *stage("image.json")],
        "image, no bytecode": [*container, "-e", "PYTHONPYCACHEPREFIX=/tmp/no-bytecode", args.image, *stage("plain.json")],
    }
    walls: dict[str, list[float]] = {k: [] for k in sides}
    phases: dict[str, list[dict]] = {k: [] for k in sides}
    try:
        for r in range(args.repeats + 1):
            order = list(sides.items())
            for side, cmd in order if r % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                done = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{side} failed ({done.returncode}): {done.stderr[-3000:]}")
                if r:  # the first round warms the file cache
                    walls[side].append(time.perf_counter() - start)
                    phases[side].append(json.loads((folder / cmd[-1]).read_text())["timing"])
    finally:
        stop_server(server)

    print(f"`pipeline-stage run`, digits CNN, full int8, real MLflow server; median of {args.repeats} alternating rounds")
    print("| where | wall (s) | " + " | ".join(PHASES) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in PHASES) + " |")
    for side in sides:
        cells = [f"{statistics.median(t.get(f'{p}_s') or 0.0 for t in phases[side]):.2f}" for p in PHASES]
        print(f"| {side} | {statistics.median(walls[side]):.2f} | " + " | ".join(cells) + " |")
    ratio = statistics.median(walls["image, no bytecode"]) / statistics.median(walls["image"])
    print(f"\nno bytecode / with bytecode: {ratio:.2f}x")
    size = int(subprocess.run(["podman", "image", "inspect", args.image, "--format", "{{.Size}}"], env=env,
                              capture_output=True, text=True, check=True).stdout)  # fmt: skip
    helps = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        subprocess.run(["podman", "run", "--rm", args.image, "--help"], env=env, check=True, capture_output=True)
        helps.append(time.perf_counter() - start)
    print(f"image size as built: {size / 1e6:,.0f} MB; `podman run --rm IMAGE --help`: {statistics.median(helps):.2f} s (median)")


if __name__ == "__main__":
    main()
