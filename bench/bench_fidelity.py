"""Benchmark: a multi-output model through the stage vs a bare script, and what fidelity metrics cost.

The model is pipeline_stage.demo.build_two_heads (inputs `audio`, `meta`; outputs `label`, `level`;
plain full int8 ruins `level`). In this one process, alternating rounds (median):

  bare      = float and int8 conversion (a dict representative dataset), both run with the LiteRT
              signature runner on 300 evaluation samples, SQNR per output against Keras
  stage     = `pipeline-stage run` (in-process) with `quantize: {mode: int8}` and a fidelity gate
              (it exits 3: the gate catches `level`); convert-and-evaluate time and whole wall time
  no-fidelity = the same stage measuring only size and latency: what the fidelity metrics add
              (the baseline's outputs are computed once per run, however many candidates or trials)

    .venv/bin/python bench/bench_fidelity.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bare_script(model, calib: dict, evaluation: dict) -> dict:
    """What a careful engineer writes by hand: both conversions, both evaluated, SQNR per output."""
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    def to_tflite(int8: bool) -> bytes:
        conv = tf.lite.TFLiteConverter.from_keras_model(model)
        if int8:
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = lambda: ({k: v[i : i + 1] for k, v in calib.items()} for i in range(200))
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        with contextlib.redirect_stdout(io.StringIO()):
            return conv.convert()

    reference = model.predict(evaluation, batch_size=64, verbose=0)

    def sqnr(fb: bytes) -> dict[str, float]:
        runner = Interpreter(model_content=fb, num_threads=2).get_signature_runner()
        n = len(evaluation["audio"])
        outs = [runner(**{k: v[s : s + 64] for k, v in evaluation.items()}) for s in range(0, n, 64)]
        got = {o: np.concatenate([out[o] for out in outs]) for o in reference}
        return {o: float(10 * np.log10(np.sum(reference[o] ** 2) / np.sum((reference[o] - got[o]) ** 2))) for o in reference}

    f, q = to_tflite(False), to_tflite(True)
    return {"float": sqnr(f), "int8": sqnr(q), "sizes": (len(f), len(q))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from pipeline_stage.engine.tf_env import import_tf

    import_tf()
    from click.testing import CliRunner

    from pipeline_stage.cli import cli
    from pipeline_stage.demo import build_two_heads

    model, inputs = build_two_heads()
    calib, evaluation = inputs(200), inputs(300)
    tmp = Path(tempfile.mkdtemp(prefix="bench-fidelity-"))
    model.save(tmp / "two_heads.keras")
    np.savez(tmp / "calib.npz", **calib)
    np.savez(tmp / "eval.npz", **evaluation)
    head = (
        f"model: {tmp / 'two_heads.keras'}\ndata: {{calibration: {tmp / 'calib.npz'}, evaluation: {tmp / 'eval.npz'}}}\n"
        "chain:\n  - quantize: {mode: int8}\n"
    )
    with_fidelity = tmp / "fidelity.yaml"
    with_fidelity.write_text(head + "evaluation: {per_step: [], threads: 2}\ngates:\n  - {metric: fidelity_sqnr_db, min: 20}\n")
    without = tmp / "plain.yaml"
    without.write_text(
        head + "evaluation: {metrics: [size_bytes, latency_p50_ms], per_step: [], threads: 2}\n"
        "gates:\n  - {metric: size_bytes, max_ratio: 0.5}\n"
    )
    uri = f"sqlite:///{tmp / 'mlflow.db'}"

    def stage(manifest: Path) -> tuple[float, float, dict]:
        t = time.perf_counter()
        res = CliRunner().invoke(cli, ["run", str(manifest), "--tracking-uri", uri, "-q", "--report", str(tmp / "r.json")])
        total = time.perf_counter() - t
        assert res.exit_code in (0, 3), res.output
        report = json.loads((tmp / "r.json").read_text())
        return report["timing"]["convert_and_evaluate_s"], total, report

    bare_t, fid_work, fid_total, plain_work = [], [], [], []
    for i in range(args.rounds + 1):  # the first round warms caches and is dropped
        t = time.perf_counter()
        bare = bare_script(model, calib, evaluation)
        b = time.perf_counter() - t
        work, total, report = stage(with_fidelity)
        p_work, _, _ = stage(without)
        if i:
            bare_t.append(b)
            fid_work.append(work)
            fid_total.append(total)
            plain_work.append(p_work)
    b, w, tot, pw = (statistics.median(v) for v in (bare_t, fid_work, fid_total, plain_work))
    cand = report["candidate"]
    print(f"two-input, two-output model, full int8, 300 evaluation samples, median of {args.rounds} alternating rounds")
    print()
    print("| output | bare script: int8 SQNR (dB) | stage: int8 SQNR (dB) | float conversion SQNR (dB) |")
    print("| --- | ---: | ---: | ---: |")
    for o in ("label", "level"):
        print(f"| {o} | {bare['int8'][o]:.2f} | {cand[f'fidelity_sqnr_db.{o}']:.2f} | {bare['float'][o]:.1f} |")
    print()
    print(
        f"stage verdict: {'passed' if report['passed'] else 'FAILED'} "
        f"(gate fidelity_sqnr_db >= 20: worst output {cand['fidelity_sqnr_db']:.2f} dB)"
    )
    print()
    print("| measure | seconds | ratio |")
    print("| --- | ---: | ---: |")
    print(f"| bare script (2 conversions, 2 evaluations, SQNR) | {b:.2f} | 1.00x |")
    print(f"| stage: convert + evaluate (MLflow I/O aside) | {w:.2f} | {w / b:.2f}x |")
    print(f"| stage: whole run incl. MLflow run and reports | {tot:.2f} | {tot / b:.2f}x |")
    print(f"| stage without fidelity metrics: convert + evaluate | {pw:.2f} | fidelity adds {w / pw:.2f}x |")


if __name__ == "__main__":
    main()
