"""Benchmark: the accuracy-aware search on the constructed case (issue 4).

The model is pipeline_stage.demo.train_bn_after_relu_cnn (BatchNorm after ReLU, raw-pixel 16x16
digits): plain full int8 fails a 1-point accuracy gate by a wide margin. Prints, from one run:
float, plain int8 and the search's winner side by side (accuracy, size, latency p50 measured in
alternating rounds in this process), and the search's wall time as a ratio to one plain int8 stage
run (median of alternating rounds), in this process and as whole `pipeline-stage run` processes.
Uses a local sqlite MLflow store.

    .venv/bin/python bench/bench_search.py [--rounds 3] [--runs 300]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=300)
    args = ap.parse_args()
    from click.testing import CliRunner

    from pipeline_stage.engine.tf_env import import_tf

    import_tf()
    import mlflow

    from pipeline_stage.cli import cli
    from pipeline_stage.demo import log_source_model, raw_digits_data, train_bn_after_relu_cnn
    from pipeline_stage.engine.litert_runtime import TFLiteModel

    tmp = Path(tempfile.mkdtemp(prefix="bench-search-"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    data = raw_digits_data()
    model = train_bn_after_relu_cnn(data)
    log_source_model(model, data, name="digits-bn-raw", alias="champion")

    search_manifest = REPO / "manifests" / "examples" / "search-auto.yaml"
    doc = yaml.safe_load(search_manifest.read_text())
    doc.pop("search")
    doc["register"] = {"name": "bench-plain-int8"}
    plain_manifest = tmp / "plain-int8.yaml"
    plain_manifest.write_text(yaml.safe_dump(doc, sort_keys=False))

    def run_args(manifest: Path, work: Path) -> list[str]:
        return [
            "run",
            str(manifest),
            "--tracking-uri",
            uri,
            "-q",
            "--new-version",
            "--workdir",
            str(work),
            "--report",
            str(work / "report.json"),
        ]

    def stage(manifest: Path, tag: str, k: int) -> tuple[float, Path]:
        work = tmp / f"{tag}-{k}"
        t = time.perf_counter()
        res = CliRunner().invoke(cli, run_args(manifest, work))
        seconds = time.perf_counter() - t
        if res.exit_code not in (0, 3):
            raise SystemExit(f"{tag} failed: {res.output[-2000:]}")
        return seconds, work

    plain_s, search_s = [], []
    for k in range(args.rounds):  # alternating rounds: both see the same machine noise
        s, plain_work = stage(plain_manifest, "plain", k)
        plain_s.append(s)
        s, search_work = stage(search_manifest, "search", k)
        search_s.append(s)

    import json

    plain = json.loads((plain_work / "report.json").read_text())
    found = json.loads((search_work / "report.json").read_text())
    from pipeline_stage.contract.report import SourceRef
    from pipeline_stage.contract.steps import ConversionSettings
    from pipeline_stage_plugins.source_tensorflow import KerasSource

    float_bytes = KerasSource(SourceRef(uri="bench"), Path("."), model).to_float_tflite(
        ConversionSettings(), None, tmp / "float.log"
    )
    variants = {
        "float TFLite": float_bytes,
        "plain int8": (plain_work / "model.tflite").read_bytes(),
        "search winner": (search_work / "model.tflite").read_bytes(),
    }
    x1 = data.evaluation[0][:1]
    lat = {name: [] for name in variants}
    for _ in range(5):
        for name, fb in variants.items():
            lat[name].append(float(np.percentile(TFLiteModel(fb, threads=1).latencies_ms(x1, args.runs), 50)))
    p50 = {name: statistics.median(v) for name, v in lat.items()}
    acc = {
        "float TFLite": plain["baseline_tflite"].get("accuracy", plain["baseline"]["accuracy"]),
        "plain int8": plain["candidate"]["accuracy"],
        "search winner": found["candidate"]["accuracy"],
    }
    keras_acc = plain["baseline"]["accuracy"]

    print(
        f"\n### Constructed case: BN after ReLU on raw-pixel 16x16 digits; Keras top-1 {keras_acc:.4f}; gate: drop <= 1 point\n"
    )
    print("| variant | chain | top-1 | drop vs Keras (pt) | gate | size (B) | size vs float | p50 (ms) | speedup vs float |")
    print("| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    chains = {"float TFLite": "(no optimization)", "plain int8": "quantize(mode=int8)", "search winner": found["search"]["chain"]}
    for name, fb in variants.items():
        drop = (keras_acc - acc[name]) * 100
        print(
            f"| {name} | `{chains[name]}` | {acc[name]:.4f} | {drop:+.2f} | {'pass' if drop <= 1.0 + 1e-9 else 'FAIL'} | "
            f"{len(fb):,} | {len(fb) / len(float_bytes):.3f}x | {p50[name]:.4f} | {p50['float TFLite'] / p50[name]:.2f}x |"
        )
    print(f"\nwinner vs plain int8 latency: {p50['search winner'] / p50['plain int8']:.2f}x")
    print(
        f"\nsearch: {len(found['search']['trials'])} trials, stopped: {found['search']['stopped_because']}; {found['search']['why']}\n"
    )
    for trial in found["search"]["trials"]:
        accuracy = trial["metrics"].get("accuracy")
        print(
            f"- trial {trial['index']} ({trial['origin']}): `{trial['chain']}`: {trial['status']}"
            + (f", top-1 {accuracy:.4f}" if accuracy is not None else "")
        )
    print()
    print("| measure | plain int8 stage run (s) | search stage run (s) | ratio (target <= 2x) |")
    print("| --- | ---: | ---: | ---: |")
    ratio = statistics.median(search_s) / statistics.median(plain_s)
    print(
        f"| wall time in this process (TensorFlow already imported), median of {args.rounds} alternating rounds | "
        f"{statistics.median(plain_s):.1f} | {statistics.median(search_s):.1f} | {ratio:.2f}x |"
    )

    # As a pipeline step runs: a new `pipeline-stage run` process each, which imports TensorFlow
    # itself (the search's workers import theirs meanwhile).
    import subprocess

    exe = str(Path(sys.executable).with_name("pipeline-stage"))
    whole: dict[str, list[float]] = {"plain": [], "search": []}
    for k in range(args.rounds):
        order = [("plain", plain_manifest), ("search", search_manifest)]
        for tag, manifest in order if k % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            cmd = [exe, *run_args(manifest, tmp / f"p-{tag}-{k}")]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode not in (0, 3):
                raise SystemExit(f"{tag} process failed: {done.stderr[-2000:]}")
            whole[tag].append(time.perf_counter() - t)
    p, s = statistics.median(whole["plain"]), statistics.median(whole["search"])
    print(f"| wall time, whole processes, median of {args.rounds} alternating rounds | {p:.1f} | {s:.1f} | {s / p:.2f}x |")


if __name__ == "__main__":
    main()
