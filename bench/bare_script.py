"""The bare script the stage is compared with (bench/bench_stage.py runs it as its own process):
what a careful engineer writes by hand for the same result, on the same files. Prints one JSON line
with its phases' seconds.

    python bench/bare_script.py MODEL.keras CALIB.npz EVAL.npz [--tuned]

`--tuned` gives it the stage's two process-level savings, so that the comparison shows what the
stage's own work costs: the imports with the cyclic garbage collector paused and their objects
frozen after (pipeline_stage.engine.heavy_imports), and no interpreter teardown at the end
(os._exit, as pipeline_stage.cli.main).
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import sys
import time

TUNED = "--tuned" in sys.argv
started = time.perf_counter()
if TUNED:
    gc.disable()
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from ai_edge_litert.interpreter import Interpreter  # noqa: E402

if TUNED:
    gc.freeze()
    gc.enable()
phases = {"imports": time.perf_counter() - started}


def phase(name: str, t0: float) -> None:
    phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0


def main(model_path: str, calib_path: str, eval_path: str) -> None:
    t = time.perf_counter()
    model = keras.models.load_model(model_path)
    calib = np.load(calib_path)["x"].astype(np.float32)
    with np.load(eval_path) as ev:
        x, y = ev["x"].astype(np.float32), ev["y"]
    phase("load", t)

    def convert(int8: bool) -> bytes:
        conv = tf.lite.TFLiteConverter.from_keras_model(model)
        if int8:
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = lambda: ([calib[i : i + 1]] for i in range(min(200, len(calib))))
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        with contextlib.redirect_stdout(io.StringIO()):
            return conv.convert()

    def evaluate(fb: bytes) -> tuple[float, float]:
        it = Interpreter(model_content=fb, num_threads=2)
        inp, out = it.get_input_details()[0], it.get_output_details()[0]
        preds = []
        for s in range(0, len(x), 64):
            chunk = x[s : s + 64]
            it.resize_tensor_input(inp["index"], list(chunk.shape))
            it.allocate_tensors()
            it.set_tensor(inp["index"], chunk)
            it.invoke()
            preds.append(it.get_tensor(out["index"]))
        acc = float(np.mean(np.concatenate(preds).argmax(-1) == y))
        one = Interpreter(model_content=fb, num_threads=1)
        one.allocate_tensors()
        one.set_tensor(one.get_input_details()[0]["index"], x[:1])
        for _ in range(10):
            one.invoke()
        times = []
        for _ in range(100):
            t0 = time.perf_counter()
            one.invoke()
            times.append((time.perf_counter() - t0) * 1000)
        return acc, float(np.median(times))

    t = time.perf_counter()
    keras_acc = float(np.mean(model.predict(x, batch_size=64, verbose=0).argmax(-1) == y))
    float_bytes = convert(False)
    float_metrics = evaluate(float_bytes)
    phase("baseline", t)
    t = time.perf_counter()
    int8_bytes = convert(True)
    phase("convert", t)
    t = time.perf_counter()
    int8_metrics = evaluate(int8_bytes)
    phase("evaluate", t)
    t = time.perf_counter()
    with open("model_int8.tflite", "wb") as fh:
        fh.write(int8_bytes)
    phase("save", t)
    phases["total"] = time.perf_counter() - started
    print(json.dumps({"phases": phases, "keras": keras_acc, "float": float_metrics, "int8": int8_metrics}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
    if TUNED:
        sys.stdout.flush()
        os._exit(0)
