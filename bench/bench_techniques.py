"""Benchmark: every quantization mode side by side, per model, in one run.

For each model (the demo's digits CNN; keras.applications.MobileNetV2 with alpha 0.35 at 96x96,
trained briefly on upscaled digits; a small LSTM reading each digit's 8 rows as a sequence):
size ratio vs float TFLite, bytes per weight parameter, gzip'd size, top-1 drop vs the Keras model
(points), latency p50 (XNNPACK, 1 thread, batch 1; median of 5 rounds that alternate over the
modes) and speedup vs float; size and bytes/param again after `strip_ops: {drop_names: true}` on
every row, the float one included. Modes: float, dynamic, float16, int8, int8 with per-tensor
weight scales, int16x8 with the converter; dynamic, int8 and per-tensor int8 with the LiteRT
Quantizer (engine litert); qat (tfmot, 2 epochs); prune (tfmot, 50%, 2 epochs) + int8.
Conversions use the stage's own source and engine plugins and the built-in prune and strip_ops steps; models run
in the LiteRT interpreter. The last tables break the MobileNetV2 int8 flatbuffers down by kind.

    .venv/bin/python bench/bench_techniques.py [--runs 200] [--epochs 3] [--size 96]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

MODES = [
    "float",
    "dynamic",
    "float16",
    "int8",
    "int8 per-tensor",
    "int16x8",
    "dynamic (litert)",
    "int8 (litert)",
    "int8 per-tensor (litert)",
    "qat",
    "prune+int8",
]


def models(data, epochs: int, size: int):
    import keras

    from pipeline_stage.demo import train_digits_cnn

    out = {"digits CNN": (train_digits_cnn(data), lambda x: x)}

    def rgb(x):  # 8x8 grey -> size x size RGB
        return np.repeat(np.kron(x, np.ones((1, size // 8, size // 8, 1), np.float32)), 3, axis=-1)

    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(weights=None, alpha=0.35, input_shape=(size, size, 3), include_top=False, pooling="avg")
    for layer in base.layers:  # Keras' 0.999 needs far more steps than 1,200 images give
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    # One flat functional model (not Sequential([base, Dense])), so the tf_keras bridge can carry it.
    mnv2 = keras.Model(base.input, keras.layers.Dense(10, activation="softmax")(base.output), name="mobilenetv2_digits")
    mnv2.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy")
    mnv2.fit(rgb(data.train[0]), data.train[1], epochs=epochs * 3, batch_size=32, verbose=0)
    out[f"MobileNetV2 (alpha 0.35, {size}x{size})"] = (mnv2, rgb)

    def rows(x):
        return x[..., 0]

    # unroll=True: a Keras 3 LSTM that is not unrolled converts to TensorList ops that need TF
    # Select (the stage names them: tf.TensorListReserve); unrolled, it is plain builtin ops.
    lstm = keras.Sequential(
        [keras.Input((8, 8)), keras.layers.LSTM(64, unroll=True), keras.layers.Dense(10, activation="softmax")]
    )
    lstm.compile("adam", "sparse_categorical_crossentropy")
    lstm.fit(rows(data.train[0]), data.train[1], epochs=epochs * 5, batch_size=32, verbose=0)
    out["LSTM (8 rows x 8)"] = (lstm, rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--size", type=int, default=96, help="MobileNetV2 input size (a multiple of 8, >= 32)")
    args = ap.parse_args()
    from pipeline_stage.engine.tf_env import import_tf

    import_tf()
    import gzip
    import tempfile

    from quantizing import quantized

    from pipeline_stage.contract.data import Dataset
    from pipeline_stage.contract.report import SourceRef
    from pipeline_stage.contract.steps import ConversionSettings, StepContext
    from pipeline_stage.demo import digits_data
    from pipeline_stage.engine.flatbuffer import read as read_flatbuffer
    from pipeline_stage.engine.litert_runtime import TFLiteModel
    from pipeline_stage_plugins.prune import Prune, PruneParams
    from pipeline_stage_plugins.source_tensorflow import KerasSource
    from pipeline_stage_plugins.strip_ops import StripOps, StripParams

    data = digits_data()
    breakdowns = []
    for title, (model, prep) in models(data, args.epochs, args.size).items():
        xe, ye = prep(data.evaluation[0]), data.evaluation[1]
        calib = Dataset(prep(data.calibration[0]), None, "calibration")
        train = Dataset(prep(data.train[0]), data.train[1], "training")
        keras_acc = float(np.mean(model.predict(xe, verbose=0).argmax(-1) == ye))
        params = model.count_params()
        rows = {}
        for mode in MODES:
            work = Path(tempfile.mkdtemp(prefix="bench-"))
            quant = mode.split()[0].replace("prune+", "")
            engine = "litert" if "litert" in mode else "converter"
            params = {"mode": quant, "per_channel": "per-tensor" not in mode}
            if quant == "qat":
                params.update(qat_epochs=2, qat_learning_rate=1e-4, qat_batch_size=32)
            settings = ConversionSettings()
            keras_model = model
            try:
                if mode.startswith("prune"):
                    ctx = StepContext(workdir=work, load_data=lambda name: train, log=lambda m: None, conversion=settings)
                    keras_model = Prune(PruneParams(target_sparsity=0.5, epochs=2)).apply(model, ctx)
                if quant == "float":
                    fb = KerasSource(SourceRef(uri="bench"), Path("."), keras_model).to_float_tflite(
                        settings, keras_model, work / "f.log"
                    )
                else:
                    fb = quantized(keras_model, None, engine, params, calib, train, hints=settings.hints)
            except Exception as exc:  # a mode that does not work on this model is a row, not a crash
                rows[mode] = str(exc).splitlines()[0][:90]
                continue
            runner = TFLiteModel(fb, threads=2)
            acc = float(np.mean(runner.predict(xe).argmax(-1) == ye))
            ctx = StepContext(workdir=work, load_data=lambda name: calib, log=lambda m: None, conversion=settings)
            stripped = StripOps(StripParams(drop_names=True)).apply(fb, ctx)
            rows[mode] = (len(fb), len(gzip.compress(fb, 9, mtime=0)), acc, fb, len(stripped))
            if title.startswith("MobileNetV2") and mode in ("int8", "int8 per-tensor"):
                breakdowns.append((f"{title}, {mode}", read_flatbuffer(fb), len(fb), params))
        # Latency in alternating rounds over all modes (these machines are noisy): median of round p50s.
        built = {mode: TFLiteModel(row[3], threads=1) for mode, row in rows.items() if not isinstance(row, str)}
        rounds: dict[str, list[float]] = {mode: [] for mode in built}
        for _ in range(5):
            for mode, interp in built.items():
                rounds[mode].append(float(np.percentile(interp.latencies_ms(xe[:1], args.runs), 50)))
        for mode in built:
            size, gz, acc, _, bare = rows[mode]
            rows[mode] = (size, gz, acc, float(np.median(rounds[mode])), bare)
        f_size, f_gz, _, f_lat, f_bare = rows["float"]
        print(f"\n### {title}: {params:,} parameters, Keras top-1 {keras_acc:.4f}\n")
        print(
            "| mode | size (B) | size vs float | bytes/param | names dropped: size vs float | names dropped: bytes/param "
            "| gzip vs float gzip | top-1 | drop vs Keras (pt) | p50 (ms) | speedup vs float |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for mode, row in rows.items():
            if isinstance(row, str):
                print(f"| {mode} | - | - | - | - | - | - | - | - | - | failed: {row} |")
                continue
            size, gz, acc, lat, bare = row
            print(
                f"| {mode} | {size:,} | {size / f_size:.3f}x | {size / params:.2f} | {bare / f_bare:.3f}x | {bare / params:.2f} "
                f"| {gz / f_gz:.3f}x | {acc:.4f} | {(keras_acc - acc) * 100:+.2f} | {lat:.4f} | {f_lat / lat:.2f}x |"
            )
    for title, info, total, params in breakdowns:
        kinds: dict[str, list[int]] = {}
        from pipeline_stage_plugins.analyze import DTYPE_BYTES

        for t in info.tensors:
            if not t.is_constant:
                continue
            n = int(np.prod(t.shape)) if t.shape else 1
            kind = {"INT8": "int8 weights (kernels)", "INT32": "int32 biases"}.get(t.dtype, f"{t.dtype.lower()} constants")
            entry = kinds.setdefault(kind, [0, 0])
            entry[0] += n * DTYPE_BYTES.get(t.dtype, 4)
            entry[1] += 1
        quant = info.quantization_param_bytes()
        names = info.tensor_name_bytes()
        kinds["quantization parameters (float32 scale + int64 zero point, per channel or per tensor)"] = [
            quant,
            sum(1 for t in info.tensors if t.quant_bytes),
        ]
        kinds["tensor names"] = [names, len(info.tensors)]
        counted = sum(v[0] for v in kinds.values())
        print(f"\n### {title}: where the {total:,} bytes go ({params:,} parameters)\n")
        print("| part | bytes | share | tensors |")
        print("| --- | ---: | ---: | ---: |")
        for kind, (nbytes, count) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
            print(f"| {kind} | {nbytes:,} | {nbytes / total:.1%} | {count} |")
        print(
            f"| graph, shapes, op codes, metadata, alignment (the rest) | {total - counted:,} | {(total - counted) / total:.1%} | - |"
        )


if __name__ == "__main__":
    main()
