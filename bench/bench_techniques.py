"""Benchmark: every quantization mode side by side, per model, in one run.

For each model (the demo's digits CNN; a MobileNetV2-style model, alpha 0.35 at 32x32, trained
briefly on upscaled digits; a small LSTM reading each digit's 8 rows as a sequence):
size ratio vs float TFLite, bytes per weight parameter, top-1 drop vs the Keras model (points),
latency p50 (XNNPACK, 1 thread, batch 1) and speedup vs float. Conversions use the stage's own
convert(); models run in the LiteRT interpreter.

    .venv/bin/python bench/bench_techniques.py [--runs 200] [--epochs 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ["float", "dynamic", "float16", "int8", "int16x8"]


def models(data, epochs: int):
    import keras

    from pipeline_stage.demo import train_digits_cnn

    out = {"digits CNN": (train_digits_cnn(data), lambda x: x)}

    def rgb32(x):  # 8x8 grey -> 32x32 RGB, the smallest input MobileNetV2 takes
        return np.repeat(np.kron(x, np.ones((1, 4, 4, 1), np.float32)), 3, axis=-1)

    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(weights=None, alpha=0.35, input_shape=(32, 32, 3), include_top=False, pooling="avg")
    for layer in base.layers:  # Keras' 0.999 needs far more steps than 1,200 images give
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    mnv2 = keras.Sequential([keras.Input((32, 32, 3)), base, keras.layers.Dense(10, activation="softmax")])
    mnv2.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy")
    mnv2.fit(rgb32(data.train[0]), data.train[1], epochs=epochs * 4, batch_size=32, verbose=0)
    out["MobileNetV2-style (alpha 0.35, 32x32)"] = (mnv2, rgb32)

    def rows(x):
        return x[..., 0]

    # unroll=True: a Keras 3 LSTM that is not unrolled converts to TensorList ops that need TF
    # Select (the stage names them: tf.TensorListReserve); unrolled, it is plain builtin ops.
    lstm = keras.Sequential([keras.Input((8, 8)), keras.layers.LSTM(64, unroll=True), keras.layers.Dense(10, activation="softmax")])
    lstm.compile("adam", "sparse_categorical_crossentropy")
    lstm.fit(rows(data.train[0]), data.train[1], epochs=epochs * 5, batch_size=32, verbose=0)
    out["LSTM (8 rows x 8)"] = (lstm, rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    from pipeline_stage._tf import import_tf

    import_tf()
    from pipeline_stage.convert import convert
    from pipeline_stage.data import Dataset
    from pipeline_stage.demo import digits_data
    from pipeline_stage.litert_runtime import TFLiteModel
    from pipeline_stage.source import SourceInfo, SourceModel
    from pipeline_stage.steps import ConversionSettings

    data = digits_data()
    for title, (model, prep) in models(data, args.epochs).items():
        xe, ye = prep(data.evaluation[0]), data.evaluation[1]
        calib = Dataset(prep(data.calibration[0]), None, "calibration")
        keras_acc = float(np.mean(model.predict(xe, verbose=0).argmax(-1) == ye))
        params = model.count_params()
        src = SourceModel(info=SourceInfo(uri="bench"), path=Path("."), keras_model=model)
        rows = {}
        for mode in MODES:
            settings = ConversionSettings(quantization=None if mode == "float" else mode,
                                          representative_data="calibration" if mode in ("int8", "int16x8") else None)
            fb = convert(src, settings, representative=calib)
            runner = TFLiteModel(fb, threads=2)
            acc = float(np.mean(runner.predict(xe).argmax(-1) == ye))
            lat = float(np.percentile(TFLiteModel(fb, threads=1).latencies_ms(xe[:1], args.runs), 50))
            rows[mode] = (len(fb), acc, lat)
        f_size, _, f_lat = rows["float"]
        print(f"\n### {title}: {params:,} parameters, Keras top-1 {keras_acc:.4f}\n")
        print("| mode | size (B) | size vs float | bytes/param | top-1 | drop vs Keras (pt) | p50 (ms) | speedup vs float |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for mode, (size, acc, lat) in rows.items():
            print(f"| {mode} | {size:,} | {size / f_size:.3f}x | {size / params:.2f} | {acc:.4f} | "
                  f"{(keras_acc - acc) * 100:+.2f} | {lat:.4f} | {f_lat / lat:.2f}x |")
        print("| qat | - | - | - | - | - | - | not built yet (issue 3: needs the Keras 3 -> tf_keras bridge) |")
        print("| prune+int8 | - | - | - | - | - | - | not built yet (issue 3) |")


if __name__ == "__main__":
    main()
