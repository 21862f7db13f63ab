"""Benchmark: the quantization recipes the stage reaches, on both engines, on three models.

Per model and recipe: bytes per parameter (the .tflite's bytes over the float model's weight and
bias elements), worst-output fidelity against the float .tflite on the evaluation inputs (SQNR, dB),
and latency against float (p50, batch 1, 1 thread, XNNPACK), float and candidate timed side by side
in alternating rounds in this one process. Every recipe is made by the stage's own engine plugins (`plugins/quantize/converter_engine.py`,
`litert_engine.py`) from the params a manifest's `quantize` step writes.

Models: `trunk` (pipeline_stage.demo.build_wide_range_trunk, a float .tflite with three outputs on
a shared trunk and an input feature 30,000x the others: the converter cannot take it and full int8
ruins it), `digits` (the demo's digits CNN, trained on sklearn's digits), `mobilenet`
(keras.applications MobileNetV2, alpha 0.35, 96x96, random weights, logits out: nothing to download).

    .venv/bin/python bench/bench_recipes.py [--rounds 5] [--runs 200]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

# (label, engine, the `quantize` step's params): what a manifest writes, run by that engine plugin
RECIPES = [
    ("converter int8", "converter", {"mode": "int8"}),
    ("litert int8", "litert", {"mode": "int8"}),
    ("litert weight-only int8", "litert", {"mode": "weight_only"}),
    ("litert weight-only int4", "litert", {"mode": "weight_only", "weight_bits": 4}),
    ("litert dynamic int4 blockwise 32", "litert", {"mode": "dynamic", "weight_bits": 4, "block_size": 32}),
    ("litert float16", "litert", {"mode": "float16"}),
]


def models() -> dict[str, dict]:
    """Each model: its float .tflite, the Keras model (None for a .tflite source), calibration and
    evaluation inputs."""
    from pipeline_stage.demo import build_wide_range_trunk, digits_data, train_digits_cnn
    from pipeline_stage.engine.tf_env import import_tf

    tf = import_tf()
    import keras

    out = {}
    flatbuffer, inputs = build_wide_range_trunk()
    out["trunk"] = {"float": flatbuffer, "keras": None, "calib": inputs(200), "eval": inputs(300)}
    data = digits_data()
    digits = train_digits_cnn(data, epochs=6)
    out["digits"] = {"keras": digits, "calib": data.calibration[0], "eval": data.evaluation[0]}
    mobilenet = keras.applications.MobileNetV2(
        input_shape=(96, 96, 3), alpha=0.35, weights=None, classes=10, classifier_activation=None
    )
    rng = np.random.default_rng(0)
    out["mobilenet"] = {
        "keras": mobilenet,
        "calib": rng.uniform(0, 1, (64, 96, 96, 3)).astype(np.float32),
        "eval": rng.uniform(0, 1, (64, 96, 96, 3)).astype(np.float32),
    }
    for spec in out.values():
        if spec["keras"] is not None:
            spec["float"] = tf.lite.TFLiteConverter.from_keras_model(spec["keras"]).convert()
    return out


def quantized(spec: dict, engine_name: str, params: dict) -> bytes | str:
    """The recipe's .tflite, made by the engine plugin from the params the `quantize` step takes, or
    why it cannot be made."""
    from quantizing import quantized as quantize

    from pipeline_stage import InputError
    from pipeline_stage.contract.data import Dataset

    if spec["keras"] is None and engine_name == "converter":
        return "n/a: a .tflite source (the converter needs the TensorFlow model)"
    try:
        return quantize(spec["keras"], spec["float"], engine_name, params, Dataset(x=spec["calib"], source="calibration"))
    except InputError as exc:
        return f"error: {exc.message[:80]}"


def worst_sqnr(model: bytes, reference: bytes, x: np.ndarray) -> float:
    from pipeline_stage.engine.litert_runtime import TFLiteModel

    def outputs(flatbuffer: bytes) -> dict[str, np.ndarray]:
        return TFLiteModel(flatbuffer, threads=2).predict_outputs(x, batch_size=32)

    want, got = outputs(reference), outputs(model)
    return min(float(10 * np.log10(np.sum(want[k] ** 2) / np.sum((want[k] - got[k]) ** 2))) for k in want)


def latency_ratio(model: bytes, reference: bytes, sample: np.ndarray, rounds: int, runs: int) -> float:
    """Median over alternating rounds of (candidate p50 / float p50)."""
    from pipeline_stage.engine.litert_runtime import TFLiteModel

    candidate, base = TFLiteModel(model, threads=1), TFLiteModel(reference, threads=1)
    ratios = []
    for _ in range(rounds):
        b = float(np.percentile(base.latencies_ms(sample, runs), 50))
        c = float(np.percentile(candidate.latencies_ms(sample, runs), 50))
        ratios.append(c / b)
    return float(np.median(ratios))


def parameters(flatbuffer: bytes) -> int:
    from pipeline_stage.engine.flatbuffer import read

    return sum(int(np.prod(t.shape)) for t in read(flatbuffer).tensors if t.is_constant and t.dtype == "FLOAT32")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    rows = []
    for name, spec in models().items():
        n = parameters(spec["float"])
        rows.append((name, "float", f"{len(spec['float']) / n:.2f}", "-", "1.00"))
        for label, engine_name, params in RECIPES:
            out = quantized(spec, engine_name, params)
            if isinstance(out, str):
                rows.append((name, label, out, "", ""))
                continue
            sqnr = worst_sqnr(out, spec["float"], spec["eval"])
            ratio = latency_ratio(out, spec["float"], spec["eval"][:1], args.rounds, args.runs)
            rows.append((name, label, f"{len(out) / n:.2f}", f"{sqnr:.1f}", f"{ratio:.2f}"))
    print("| model | recipe | bytes / parameter | worst-output SQNR vs float (dB) | latency vs float (p50, side by side) |")
    print("| --- | --- | ---: | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
