"""Benchmark: the stage vs a bare TFLiteConverter script doing the same work, and CLI start-up.

Both sides run in this one process, alternating, on the demo's digits CNN:
  bare   = float conversion + int8 conversion + Keras accuracy + float/int8 TFLite accuracy,
           size and latency (the LiteRT interpreter, as the stage measures them)
  stage  = `pipeline-stage run` on the same model and data, in-process; we compare its
           convert-and-evaluate time (MLflow I/O aside) and also show its whole wall time.
Then `pipeline-stage validate` start-up in a fresh process vs `python -c pass`.

    .venv/bin/python bench/bench_stage.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bare_script(model, calib, ev, latency_runs: int) -> dict:
    """What a careful engineer writes by hand for the same result."""
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    def to_tflite(int8: bool) -> bytes:
        conv = tf.lite.TFLiteConverter.from_keras_model(model)
        if int8:
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = lambda: ([calib[i : i + 1]] for i in range(200))
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        with contextlib.redirect_stdout(io.StringIO()):  # Keras' export prints; the stage hides it too
            return conv.convert()

    def evaluate(fb: bytes) -> tuple[float, float]:
        it = Interpreter(model_content=fb, num_threads=2)
        inp, out = it.get_input_details()[0], it.get_output_details()[0]
        it.resize_tensor_input(inp["index"], [64, 8, 8, 1])
        it.allocate_tensors()
        preds = []
        for s in range(0, len(ev[0]), 64):
            chunk = ev[0][s : s + 64]
            if len(chunk) != 64:
                it.resize_tensor_input(inp["index"], [len(chunk), 8, 8, 1])
                it.allocate_tensors()
            it.set_tensor(inp["index"], chunk)
            it.invoke()
            preds.append(it.get_tensor(out["index"]))
        acc = float(np.mean(np.concatenate(preds).argmax(-1) == ev[1]))
        one = Interpreter(model_content=fb, num_threads=1)
        one.allocate_tensors()
        one.set_tensor(one.get_input_details()[0]["index"], ev[0][:1])
        for _ in range(10):
            one.invoke()
        times = []
        for _ in range(latency_runs):
            t = time.perf_counter()
            one.invoke()
            times.append((time.perf_counter() - t) * 1000)
        return acc, float(np.median(times))

    keras_acc = float(np.mean(model.predict(ev[0], batch_size=64, verbose=0).argmax(-1) == ev[1]))
    f, q = to_tflite(False), to_tflite(True)
    return {"keras": keras_acc, "float": evaluate(f), "int8": evaluate(q), "sizes": (len(f), len(q))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from pipeline_stage.engine.tf_env import import_tf

    import_tf()
    from click.testing import CliRunner

    from pipeline_stage.cli import cli
    from pipeline_stage.demo import digits_data, train_digits_cnn

    data = digits_data()
    model = train_digits_cnn(data)
    tmp = Path(tempfile.mkdtemp(prefix="bench-stage-"))
    model.save(tmp / "digits.keras")
    np.savez(tmp / "calib.npz", x=data.calibration[0], y=data.calibration[1])
    np.savez(tmp / "eval.npz", x=data.evaluation[0], y=data.evaluation[1])
    manifest = tmp / "m.yaml"
    manifest.write_text(
        f"model: {tmp / 'digits.keras'}\ndata: {{calibration: {tmp / 'calib.npz'}, evaluation: {tmp / 'eval.npz'}}}\n"
        "chain:\n  - quantize: {mode: int8}\nevaluation: {per_step: [], latency_runs: 100, threads: 2}\n"
        "gates:\n  - {metric: accuracy, max_drop: 0.01}\nregister: {name: bench-digits, alias: bench}\n"
    )
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    import json

    bare_t, stage_work_t, stage_total_t = [], [], []
    for i in range(args.repeats + 1):  # the first round warms caches and is dropped
        t = time.perf_counter()
        bare_script(model, data.calibration[0], data.evaluation, 100)
        b = time.perf_counter() - t
        t = time.perf_counter()
        res = CliRunner().invoke(cli, ["run", str(manifest), "--tracking-uri", uri, "-q", "--report", str(tmp / "r.json")])
        total = time.perf_counter() - t
        assert res.exit_code == 0, res.output
        work = json.loads((tmp / "r.json").read_text())["timing"]["convert_and_evaluate_s"]
        if i:
            bare_t.append(b)
            stage_work_t.append(work)
            stage_total_t.append(total)
    b, w, tot = statistics.median(bare_t), statistics.median(stage_work_t), statistics.median(stage_total_t)

    def startup(cmd: list[str]) -> float:
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    exe = str(Path(sys.executable).with_name("pipeline-stage"))
    v = startup([exe, "validate", str(REPO / "manifests/examples/digits-int8.yaml")])
    h = startup([exe, "--help"])
    py = startup([sys.executable, "-c", "pass"])
    print(f"stage vs bare script, digits CNN, int8, median of {args.repeats} alternating rounds")
    print("| measure | bare script (s) | stage (s) | ratio (target <= 1.3x) |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| convert + evaluate (MLflow I/O aside) | {b:.2f} | {w:.2f} | {w / b:.2f}x |")
    print(f"| whole `pipeline-stage run` incl. MLflow run, logging, registration | {b:.2f} | {tot:.2f} | {tot / b:.2f}x (info) |")
    print()
    print("| start-up | seconds | vs `python -c pass` | target |")
    print("| --- | ---: | ---: | --- |")
    print(f"| `pipeline-stage validate` | {v:.3f} | {v / py:.1f}x | < 1 s |")
    print(f"| `pipeline-stage --help` | {h:.3f} | {h / py:.1f}x | < 1 s |")


if __name__ == "__main__":
    main()
