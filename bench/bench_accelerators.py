"""Benchmark: NPU coverage and compiled models from LiteRT's own compiler plugins (Intel's, which
loads here with OpenVINO from the `intel` extra).

Part 1, per model, as the stage's `compile` section does it for `intel_openvino/LNL` with
`graph_backend: cpu`: ops offloaded of the main graph (partitions, ops left on the CPU), the
compile's seconds, the compiled file's bytes over the portable file's, and the compiled model's
outputs against the portable model's on the same inputs (SQNR of the worst output, max abs
difference), run through Intel's dispatch library. Models: the demo's digits CNN (float and int8,
as the stage converts them: a dynamic batch) and the shipped `.tflite` corpus (tests/tflite_corpus:
fixed batch 1; the custom-op file left out, its kernel being a plugin's).

Part 2: what the `compile` section adds to a whole `pipeline-stage run` (digits CNN, full int8, a
local sqlite store), with and without two Intel CPU-backend targets, alternating, in one process.

    .venv/bin/python bench/bench_accelerators.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CORPUS = REPO / "tests" / "tflite_corpus"
from tests.helpers import sqnr_db  # noqa: E402
from tests.tflite_corpus.make_corpus import images as corpus_images  # noqa: E402


def _int8(converter_of, calibration: np.ndarray) -> bytes:
    converter = converter_of()
    converter.optimizations = [__import__("tensorflow").lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([calibration[i : i + 1]] for i in range(min(100, len(calibration))))
    return converter.convert()


def models() -> dict[str, tuple[bytes, np.ndarray]]:
    """name -> (the portable .tflite, inputs to compare outputs on)."""
    from pipeline_stage.demo import digits_data, train_digits_cnn
    from pipeline_stage.engine.tf_env import import_tf

    tf = import_tf()
    out = {}
    data = digits_data()
    digits = train_digits_cnn(data)
    x_digits = data.evaluation[0][:64].astype(np.float32)
    out["digits CNN float"] = (tf.lite.TFLiteConverter.from_keras_model(digits).convert(), x_digits)
    out["digits CNN int8"] = (_int8(lambda: tf.lite.TFLiteConverter.from_keras_model(digits), data.calibration[0]), x_digits)
    images = corpus_images()
    for path in sorted(CORPUS.glob("*.tflite")):
        if "custom_op" not in path.stem:  # its kernel is a plugin's; the compiler leaves the op on the CPU
            out[f"corpus {path.stem}"] = (path.read_bytes(), images[100:132])
    return out


def part1() -> list[list[str]]:
    from pipeline_stage.engine.litert_runtime import TFLiteModel
    from pipeline_stage_plugins.compile_litert import COMPILERS

    intel = COMPILERS["intel_openvino"]()
    options = intel.Params(graph_backend="cpu")
    rows = []
    for name, (portable, x) in models().items():
        started = time.perf_counter()
        compiled = intel.compile(portable, "LNL", options)
        seconds = time.perf_counter() - started
        part = compiled.partition
        on_cpu = ", ".join(f"{op} x{n}" for op, n in part.on_cpu.items()) or "none"
        head = [name, f"{part.offloaded}/{part.ops}", str(part.partitions), on_cpu, f"{seconds:.2f}"]
        head.append(f"{len(compiled.model_bytes) / len(portable):.2f}x")
        expected = TFLiteModel(portable).predict_outputs(x)
        try:
            got = intel.runner(compiled, "LNL", options)(x)
        except RuntimeError as exc:  # what the stage reports as the target's failure
            rows.append([*head, f"does not run here: {str(exc).splitlines()[-1].strip(' └')}", "-"])
            print(" | ".join(rows[-1]), flush=True)
            continue
        sqnr = min(sqnr_db(expected, got).values())
        worst = max(float(np.max(np.abs(expected[k] - got[k]))) for k in expected)
        rows.append([*head, f"{sqnr:.1f}", f"{worst:.1e}"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def part2(rounds: int) -> dict[str, list[float]]:
    from click.testing import CliRunner

    from pipeline_stage.cli import cli
    from pipeline_stage.demo import digits_data, train_digits_cnn

    tmp = Path(tempfile.mkdtemp(prefix="bench-accelerators-"))
    data = digits_data()
    train_digits_cnn(data).save(tmp / "digits.keras")
    np.savez(tmp / "calib.npz", x=data.calibration[0])
    np.savez(tmp / "eval.npz", x=data.evaluation[0], y=data.evaluation[1])
    base = {
        "model": str(tmp / "digits.keras"),
        "data": {"calibration": str(tmp / "calib.npz"), "evaluation": str(tmp / "eval.npz")},
        "chain": [{"quantize": {"mode": "int8"}}],
        "evaluation": {"metrics": ["accuracy", "fidelity_sqnr_db", "size_bytes", "latency_p50_ms"]},
        "gates": [{"metric": "accuracy", "max_drop": 0.02}],
        "register": {"name": "bench-npu"},
    }
    targets = [{"target": f"intel_openvino/{soc}", "options": {"graph_backend": "cpu"}} for soc in ("LNL", "PTL")]
    manifests = {"without compile": base, "with 2 Intel targets": {**base, "compile": {"targets": targets}}}
    seconds: dict[str, list[float]] = {k: [] for k in manifests}
    compile_s: list[float] = []
    for r in range(rounds + 1):  # the first round warms the imports and is dropped
        for key, doc in manifests.items():
            path = tmp / f"{key.split()[0]}.yaml"
            path.write_text(yaml.safe_dump(doc, sort_keys=False))
            report = tmp / f"{key.split()[0]}-{r}.json"
            started = time.perf_counter()
            args = [
                "run",
                str(path),
                "--tracking-uri",
                f"sqlite:///{tmp / 'mlflow.db'}",
                "-q",
                "--report",
                str(report),
                "--new-version",
            ]
            result = CliRunner().invoke(cli, args)
            elapsed = time.perf_counter() - started
            assert result.exit_code == 0, result.output
            if r:
                seconds[key].append(elapsed)
                timing = json.loads(report.read_text())["timing"]
                if timing.get("compile_s") is not None:
                    compile_s.append(timing["compile_s"])
    seconds["compile phase (report timing)"] = compile_s
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rows = part1()
    print(
        "\n| model | ops offloaded | partitions | left on the CPU | compile s | compiled / portable bytes | SQNR vs portable (dB) | max abs diff |"
    )
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    seconds = part2(args.rounds)
    plain = statistics.median(seconds["without compile"])
    print(f"\n`pipeline-stage run`, digits CNN int8, median of {args.rounds} alternating rounds")
    print("| run | seconds | vs without |")
    print("| --- | ---: | ---: |")
    for key, values in seconds.items():
        value = statistics.median(values)
        print(f"| {key} | {value:.2f} | {value / plain:.2f}x |")


if __name__ == "__main__":
    main()
