"""Benchmark: the stage's evaluation (batched, multi-threaded LiteRT interpreter) vs a single-thread
per-sample interpreter loop, on the benchmark CNNs, float and full int8; predictions compared.

Both sides run in this process in alternating rounds (the order reversed every other round), on
the same .tflite and the same samples:
  loop   = Interpreter(num_threads=1), batch 1, one invoke per sample (what a first script does)
  stage  = pipeline_stage.engine.litert_runtime.TFLiteModel(threads=all cores).predict_outputs(batch 64)

    .venv/bin/python bench/bench_eval.py [--rounds 5] [--samples 3000]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def mnist_sized_cnn():
    """A 28x28x1 CNN of about 35k parameters (the stage benchmark's MNIST-sized model), seeded weights."""
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((28, 28, 1), name="image"),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )


def convert(model, calib: np.ndarray, int8: bool) -> bytes:
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: ([calib[i : i + 1]] for i in range(len(calib)))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return conv.convert()


def per_sample_loop(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model_bytes, num_threads=1)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    preds = []
    for i in range(len(x)):
        sample = x[i : i + 1]
        if inp["dtype"] != np.float32:
            scale, zero = inp["quantization"]
            sample = np.clip(np.round(sample / scale + zero), -128, 127).astype(inp["dtype"])
        it.set_tensor(inp["index"], sample)
        it.invoke()
        y = it.get_tensor(out["index"])
        if out["dtype"] != np.float32:
            scale, zero = out["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        preds.append(y)
    return np.concatenate(preds)


def stage_evaluation(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    from pipeline_stage.engine.evaluate import default_threads
    from pipeline_stage.engine.litert_runtime import TFLiteModel

    return TFLiteModel(model_bytes, threads=default_threads()).predict(x, batch_size=64)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=3000)
    args = parser.parse_args()
    from pipeline_stage.demo import digits_data, train_digits_cnn
    from pipeline_stage.engine.evaluate import default_threads

    rng = np.random.default_rng(0)
    data = digits_data()
    digits = train_digits_cnn(data)
    x_digits = data.evaluation[0].astype(np.float32)
    x_digits = np.concatenate([x_digits] * (args.samples // len(x_digits) + 1))[: args.samples]
    x_mnist = rng.uniform(0, 1, (args.samples, 28, 28, 1)).astype(np.float32)
    cases = []
    for label, model, x in (("digits CNN 8x8", digits, x_digits), ("MNIST-sized CNN 28x28", mnist_sized_cnn(), x_mnist)):
        for int8 in (False, True):
            cases.append((f"{label}, {'int8' if int8 else 'float'}", convert(model, x[:200], int8), x))

    print(f"{os.cpu_count()} cores, stage threads {default_threads()}, {args.samples} samples, {args.rounds} alternating rounds")
    print("| model | loop s (median) | stage s (median) | stage speed-up | top-1 identical | max abs diff |")
    print("| --- | ---: | ---: | ---: | --- | ---: |")
    for name, model_bytes, x in cases:
        times: dict[str, list[float]] = {"loop": [], "stage": []}
        preds = {}
        sides = [("loop", per_sample_loop), ("stage", stage_evaluation)]
        for r in range(args.rounds):
            for side, fn in sides if r % 2 == 0 else sides[::-1]:
                start = time.perf_counter()
                preds[side] = fn(model_bytes, x)
                times[side].append(time.perf_counter() - start)
        loop, stage = statistics.median(times["loop"]), statistics.median(times["stage"])
        same = bool(np.array_equal(preds["loop"].argmax(-1), preds["stage"].argmax(-1)))
        diff = float(np.max(np.abs(preds["loop"] - preds["stage"])))
        print(f"| {name} | {loop:.3f} | {stage:.3f} | {loop / stage:.2f}x | {same} | {diff:.2e} |")


if __name__ == "__main__":
    main()
