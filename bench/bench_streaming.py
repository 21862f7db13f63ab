"""Benchmark: the stage's memory against the number of evaluation samples (issue 22).

`pipeline-stage run` (full int8, a fidelity gate, a local store) on a small CNN over 64x64x3
float32 inputs, with 2,000, 20,000 and 50,000 evaluation samples (98 MB, 983 MB and 2.5 GB of float32), the
data given as one `.npz` (loaded whole, as before), as four TFRecord shards (`eval-*.tfrecord`,
read as a stream into memory-mapped files), and as TFRecord shards with an `auto` search (its
trials in worker processes). Prints the peak RSS of the whole process tree (wait4) at each size,
the ratio of the largest to the smallest, and the largest set's size on disk; then the evaluation's seconds per sample,
`.npz` against TFRecord on the same 2,000 samples, in alternating rounds.

    .venv/bin/python bench/bench_streaming.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPE = (64, 64, 3)
SIZES = (2_000, 20_000, 50_000)
SHARDS = 4


def write_data(folder: Path, n: int) -> dict[str, Path]:
    """`n` random samples as .npz and as TFRecord shards, written a chunk at a time."""
    import tensorflow as tf

    folder.mkdir(parents=True)
    rng = np.random.default_rng(n)
    raw = np.lib.format.open_memmap(folder / "x.npy", mode="w+", dtype=np.float32, shape=(n, *SHAPE))
    for start in range(0, n, 1000):
        raw[start : start + 1000] = rng.uniform(0, 1, size=(min(1000, n - start), *SHAPE)).astype(np.float32)
    raw.flush()
    np.savez(folder / "eval.npz", x=raw)
    per = -(-n // SHARDS)
    for s in range(SHARDS):
        with tf.io.TFRecordWriter(str(folder / f"eval-{s}.tfrecord")) as writer:
            for i in range(s * per, min(n, (s + 1) * per)):
                feature = {"x": tf.train.Feature(float_list=tf.train.FloatList(value=raw[i].reshape(-1)))}
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    del raw
    (folder / "x.npy").unlink()
    return {"npz": folder / "eval.npz", "tfrecord": folder / "eval-*.tfrecord"}


def model(path: Path) -> None:
    import keras

    keras.utils.set_random_seed(0)
    net = keras.Sequential(
        [
            keras.Input(SHAPE),
            keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    net.save(path)


def manifest(tmp: Path, name: str, evaluation: Path, search: bool) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(
        f"model: {tmp / 'model.keras'}\ndata: {{calibration: {tmp / 'calib.npz'}, evaluation: '{evaluation}'}}\n"
        "chain:\n  - quantize: {mode: int8}\n"
        "evaluation: {metrics: [fidelity_sqnr_db, size_bytes], per_step: []}\n"
        "gates:\n  - {metric: fidelity_sqnr_db, min: 10}\n"
        + ("search: {strategy: auto, budget: {trials: 3}, parallel: 2}\n" if search else "")
    )
    return path


def run(tmp: Path, path: Path) -> tuple[float, float, dict]:
    from bench.bench_stage import timed_process

    exe = str(Path(sys.executable).with_name("pipeline-stage"))
    report = path.with_suffix(".json")
    wall, rss, _ = timed_process(
        [exe, "run", str(path), "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "-q", "--report", str(report)], tmp
    )
    return wall, rss, json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-streaming-"))
    model(tmp / "model.keras")
    np.savez(tmp / "calib.npz", x=np.random.default_rng(1).uniform(0, 1, size=(100, *SHAPE)).astype(np.float32))
    data = {n: write_data(tmp / f"n{n}", n) for n in SIZES}
    on_disk = {n: sum(f.stat().st_size for f in (tmp / f"n{n}").glob("eval-*.tfrecord")) / 2**20 for n in SIZES}

    big = SIZES[-1]
    print(f"peak RSS of the stage's process tree (MB), {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} float32 inputs, full int8")
    print(
        "| data | "
        + " | ".join(f"{n:,} samples" for n in SIZES)
        + f" | ratio {big:,} / {SIZES[0]:,} | the {big:,} set on disk (MB) | wall at {big:,} (s) |"
    )
    print("| --- |" + " ---: |" * (len(SIZES) + 3))
    for label, fmt, search in (
        ("one .npz (loaded whole)", "npz", False),
        ("TFRecord shards (streamed)", "tfrecord", False),
        ("TFRecord shards, auto search (3 trials)", "tfrecord", True),
    ):
        rss, walls = {}, {}
        for n in SIZES:
            walls[n], rss[n], report = run(tmp, manifest(tmp, f"{fmt}-{n}-{search}", data[n][fmt], search))
            assert report["passed"], report["gates"]
        cells = " | ".join(f"{rss[n]:.0f}" for n in SIZES)
        print(f"| {label} | {cells} | {rss[big] / rss[SIZES[0]]:.2f}x | {on_disk[big]:.0f} | {walls[big]:.0f} |")

    # Evaluation seconds per sample: the baseline's and the candidate's evaluation (report timing),
    # .npz and TFRecord on the same samples, alternating.
    n = SIZES[0]
    per_sample: dict[str, list[float]] = {"npz": [], "tfrecord": []}
    loading: dict[str, list[float]] = {"npz": [], "tfrecord": []}
    for r in range(args.rounds):
        for fmt in ("npz", "tfrecord") if r % 2 == 0 else ("tfrecord", "npz"):
            _, _, report = run(tmp, manifest(tmp, f"tp-{fmt}", data[n][fmt], False))
            t = report["timing"]
            per_sample[fmt].append((t["baseline_s"] + t["evaluate_s"]) / n * 1e3)
            loading[fmt].append(t["load_s"])
    npz, tfr = statistics.median(per_sample["npz"]), statistics.median(per_sample["tfrecord"])
    print()
    print(f"evaluation (baseline + candidate) per sample, {n:,} samples, median of {args.rounds} alternating rounds")
    print("| data | ms per sample | throughput vs .npz | loading the model and data (s) |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| one .npz | {npz:.3f} | 1.00x | {statistics.median(loading['npz']):.2f} |")
    print(f"| TFRecord shards, memory-mapped | {tfr:.3f} | {npz / tfr:.2f}x | {statistics.median(loading['tfrecord']):.2f} |")


if __name__ == "__main__":
    main()
