"""Benchmark: why full int8 buys less speed on MobileNetV2 at 96x96 than on small convnets.

Times single-layer models cut to the shapes of MobileNetV2 (alpha 0.35) at 96x96, float vs full
int8 (converter, per-channel), XNNPACK with 1 thread, batch 1, median of 5 alternating rounds.
The per-layer speedups show which layer kinds int8 speeds up and which it does not.

    .venv/bin/python bench/bench_layers.py [--runs 300]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (name, input shape, layer factory): the shapes of MobileNetV2 alpha 0.35 at 96x96 input
LAYERS = [
    (
        "first conv 3x3/2, 96x96x3 -> 48x48x16",
        (96, 96, 3),
        lambda k: k.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu6"),
    ),
    ("expand 1x1, 24x24x8 -> 48", (24, 24, 8), lambda k: k.layers.Conv2D(48, 1, activation="relu6")),
    ("depthwise 3x3, 24x24x48", (24, 24, 48), lambda k: k.layers.DepthwiseConv2D(3, padding="same", activation="relu6")),
    ("project 1x1, 24x24x48 -> 8", (24, 24, 48), lambda k: k.layers.Conv2D(8, 1)),
    ("depthwise 3x3, 6x6x192", (6, 6, 192), lambda k: k.layers.DepthwiseConv2D(3, padding="same", activation="relu6")),
    ("expand 1x1, 6x6x32 -> 192", (6, 6, 32), lambda k: k.layers.Conv2D(192, 1, activation="relu6")),
    ("last 1x1, 3x3x112 -> 1280", (3, 3, 112), lambda k: k.layers.Conv2D(1280, 1, activation="relu6")),
]


def _variants(tf, keras, TFLiteModel, make, shape, rng):
    """The one-layer model as float, int8 with float I/O, and int8 with int8 I/O; and a sample."""
    inp = keras.Input(shape)
    model = keras.Model(inp, make(keras)(inp))
    samples = rng.normal(size=(50, *shape)).astype(np.float32)

    def convert(quantize: bool, int8_io: bool = False) -> bytes:
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        if quantize:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda: ([s[None]] for s in samples)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            converter.inference_input_type = converter.inference_output_type = tf.int8
        return converter.convert()

    return {
        "float": TFLiteModel(convert(False), threads=1),
        "int8": TFLiteModel(convert(True), threads=1),
        "int8, int8 I/O": TFLiteModel(convert(True, True), threads=1),
    }, samples[:1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=300)
    args = ap.parse_args()
    from pipeline_stage.engine.tf_env import import_tf, stdout_to_stderr

    tf = import_tf()
    import keras

    from pipeline_stage.engine.litert_runtime import TFLiteModel

    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    built = {}
    with stdout_to_stderr():  # the converter prints its SavedModel endpoints; the table owns stdout
        for name, shape, make in LAYERS:
            built[name] = _variants(tf, keras, TFLiteModel, make, shape, rng)
    rounds: dict[tuple[str, str], list[float]] = {}
    for _ in range(5):
        for name, (variants, sample) in built.items():
            for kind, runner in variants.items():
                rounds.setdefault((name, kind), []).append(float(np.percentile(runner.latencies_ms(sample, args.runs), 50)))
    print(
        "| layer (MobileNetV2 alpha 0.35 at 96x96) | float p50 (ms) | int8 p50 (ms) | speedup | int8 with int8 I/O (ms) | speedup |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in built:
        f, q, qi = (float(np.median(rounds[(name, k)])) for k in ("float", "int8", "int8, int8 I/O"))
        print(f"| {name} | {f:.4f} | {q:.4f} | {f / q:.2f}x | {qi:.4f} | {f / qi:.2f}x |")


if __name__ == "__main__":
    main()
