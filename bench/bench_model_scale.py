"""Benchmark: the stage's fixed cost against model size (issue 22, item 6).

`pipeline-stage run` (a real `mlflow server` on loopback: its run, the .tflite, the pyfunc, a new
registered version; `--new-version`) against `bench/bare_script.py` (the same float and int8
conversions, evaluation and latency by hand), whole processes in alternating rounds (the first
dropped), on `keras.applications` MobileNetV2, EfficientNetB0 and ResNet50 with random weights
(nothing to download) at 96x96x3, full int8, 32 calibration and 64 evaluation images. Prints the
ratio per model, the stage's phases and both sides' peak RSS (the process tree, through
`timed_process`'s launcher).

    .venv/bin/python bench/bench_model_scale.py [--repeats 2] [--models ResNet50]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHAPE = (96, 96, 3)
MODELS = ("MobileNetV2", "EfficientNetB0", "ResNet50")

PREPARE = """
import sys, numpy as np, keras
name, folder = sys.argv[1], sys.argv[2]
keras.utils.set_random_seed(0)
model = getattr(keras.applications, name)(weights=None, input_shape=(96, 96, 3), classes=10)
rng = np.random.default_rng(0)
x = rng.uniform(0, 1, (96, 96, 96, 3)).astype(np.float32)
y = model.predict(x, verbose=0).argmax(-1)  # labels the float model gets right
model.save(f"{folder}/model.keras")
np.savez(f"{folder}/calib.npz", x=x[:32])
np.savez(f"{folder}/eval.npz", x=x[32:], y=y[32:])
print(model.count_params())
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, of the default")
    args = parser.parse_args()
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"--models: unknown {', '.join(sorted(unknown))} (choose from {', '.join(MODELS)})")
    models = [m for m in MODELS if m in args.models.split(",")]
    from bench.bench_stage import BARE_PHASES, STAGE_PHASES, alternating_rounds, bare_command
    from tests.services import start_mlflow_server, stop_server

    tmp = Path(tempfile.mkdtemp(prefix="bench-model-scale-"))
    server, uri = start_mlflow_server(tmp / "server")
    exe = str(Path(sys.executable).with_name("pipeline-stage"))
    rows = []
    try:
        for name in models:
            folder = tmp / name
            folder.mkdir()
            # built in a child: this process stays small (and so do the peak RSS figures' floors)
            out = subprocess.run([sys.executable, "-c", PREPARE, name, str(folder)], check=True, capture_output=True, text=True)
            params = int(out.stdout.strip().splitlines()[-1])
            (folder / "m.yaml").write_text(
                f"model: {folder / 'model.keras'}\n"
                f"data: {{calibration: {folder / 'calib.npz'}, evaluation: {folder / 'eval.npz'}}}\n"
                "chain:\n  - quantize: {mode: int8}\n"
                "evaluation: {per_step: [], latency_runs: 100, threads: 2}\n"
                f"gates:\n  - {{metric: size_bytes, max_ratio: 0.5}}\nregister: {{name: bench-scale-{name.lower()}}}\n"
            )
            stage = [exe, "run", str(folder / "m.yaml"), "--tracking-uri", uri, "-q", "--report", str(folder / "r.json")]
            got = alternating_rounds(bare_command(folder), [*stage, "--new-version"], folder, args.repeats)
            rows.append((name, params, got))
            print(f"{name}: done", file=sys.stderr)
    finally:
        stop_server(server)

    print(
        f"`pipeline-stage run` (real MLflow server) vs the bare script, whole processes, median of {args.repeats} alternating rounds"
    )
    print("| model | parameters | bare script (s) | stage (s) | ratio | peak RSS bare / stage (MB) |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    ratios = {}
    for name, params, got in rows:
        b, s = statistics.median(got["bare"]), statistics.median(got["stage"])
        ratios[name] = s / b
        rss = f"{statistics.median(got['bare_rss']):.0f} / {statistics.median(got['stage_rss']):.0f}"
        print(f"| {name} | {params:,} | {b:.1f} | {s:.1f} | {s / b:.2f}x | {rss} |")
    print()
    print(f"largest model's ratio over the smallest's: {ratios[models[-1]] / ratios[models[0]]:.2f} (target <= 1.1)")
    _phase_table("the stage's phases (median seconds)", rows, "stage_phases", {p: f"{p}_s" for p in STAGE_PHASES})
    _phase_table("the bare script's phases (median seconds)", rows, "bare_phases", {p: p for p in (*BARE_PHASES, "total")})


def _phase_table(title: str, rows: list, side: str, columns: dict[str, str]) -> None:
    """A markdown table of `side`'s median phase seconds per model: each column, by its heading,
    the key it has in a round's phases (a phase a round lacks counts as 0)."""
    print()
    print(title)
    print("| model | " + " | ".join(columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for name, _, got in rows:
        cells = " | ".join(f"{statistics.median(t.get(key) or 0.0 for t in got[side]):.2f}" for key in columns.values())
        print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()
