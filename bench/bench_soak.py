"""Soak: many stages into one model name, N at a time, against a real server; nothing may be lost.

Starts its own services on 127.0.0.1 (tests/services.py): `mlflow server` on PostgreSQL with
artifacts proxied to S3 (moto), or on sqlite with `--store sqlite`. Trains the demo's digits CNN,
logs it, then runs `pipeline-stage run --new-version` (dynamic range, one accuracy gate, alias
`prod`) `--runs` times, `--parallel` at a time, as separate processes. Prints: runs, failures
(non-zero exits), READY versions carrying their digests, versions lost, runs wrongly ended by a
sibling, whether the alias ends on the newest version, and the time per run under load against
one run alone, measured in the same invocation (the alone runs come first and last, and the
median of those is the reference).

    .venv/bin/python bench/bench_soak.py [--runs 40] [--parallel 8] [--store postgres|sqlite]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
EXE = str(Path(sys.executable).with_name("pipeline-stage"))

MANIFEST = """model: models:/digits-cnn@champion
data: {evaluation: 'runs:/${source.run_id}/data/eval.npz'}
experiment: soak
chain:
  - quantize: {mode: dynamic}
gates:
  - {metric: accuracy, max_drop: 0.02}
register: {name: digits-soak, alias: prod}
"""


def one(manifest: Path, uri: str, k: int) -> dict:
    report = manifest.with_name(f"r{k}.json")
    start = time.perf_counter()
    proc = subprocess.run(
        [EXE, "run", str(manifest), "-q", "--new-version", "--report", str(report)],
        capture_output=True,
        text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
    )
    wall = time.perf_counter() - start
    data = json.loads(report.read_text()) if report.exists() else {}
    return {"code": proc.returncode, "wall": wall, "report": data, "stderr": proc.stderr[-400:]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--store", choices=["postgres", "sqlite"], default="postgres")
    args = ap.parse_args()

    import mlflow

    from pipeline_stage.demo import digits_data, log_source_model, train_digits_cnn
    from tests.services import S3, Postgres, start_mlflow_server, stop_server

    tmp = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    services = []
    if args.store == "postgres":
        pg, s3 = Postgres(), S3(tmp / "s3")
        services += [pg.stop, s3.stop]
        backend, bucket = pg.database("soak"), s3.bucket("soak-artifacts")
        proc, uri = start_mlflow_server(tmp / "server", backend=backend, artifacts=f"s3://{bucket}/a", workers=2, env=s3.env)
    else:
        proc, uri = start_mlflow_server(tmp / "server")
    try:
        mlflow.set_tracking_uri(uri)
        data = digits_data()
        log_source_model(train_digits_cnn(data), data)
        manifest = tmp / "soak.yaml"
        manifest.write_text(MANIFEST)

        alone = [one(manifest, uri, -1), one(manifest, uri, -2)]
        started = time.perf_counter()
        with ThreadPoolExecutor(args.parallel) as pool:
            loaded = list(pool.map(lambda k: one(manifest, uri, k), range(args.runs)))
        soak_wall = time.perf_counter() - started
        alone.append(one(manifest, uri, -3))

        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        versions = client.search_model_versions("name='digits-soak'", max_results=1000)
        good = [
            v
            for v in versions
            if v.status == "READY"
            and v.tags.get("pipeline_stage.passed") == "true"
            and "pipeline_stage.sha256.model/artifacts/model.tflite" in v.tags
        ]
        everything = loaded + alone
        runs = [client.get_run(r["report"]["run_id"]) for r in everything if r["report"].get("run_id")]
        wrongly = sum(r.info.status != "FINISHED" or "pipeline_stage.ended_by" in r.data.tags for r in runs)
        wrongly += sum(bool(r["report"].get("ended_orphans")) for r in everything)
        failures = [r for r in everything if r["code"] != 0]
        holder = client.get_model_version_by_alias("digits-soak", "prod").version
        alone_s = statistics.median(r["wall"] for r in alone)
        under_load = statistics.median(r["wall"] for r in loaded)
        print(f"store: {args.store}; {args.runs} runs, {args.parallel} at a time (+{len(alone)} alone)")
        print(f"failures: {len(failures)}")
        for f in failures:
            print("  ", f["code"], f["stderr"].strip().splitlines()[-1:] if f["stderr"] else "")
        print(f"versions: {len(versions)} registered, {len(good)} READY with digests (expected {len(everything)})")
        print(f"versions lost: {len(everything) - len(good)}")
        print(f"runs wrongly ended by a sibling: {wrongly}")
        print(f"alias prod on the newest version: {holder == str(max(int(v.version) for v in versions))} (v{holder})")
        print(f"one run alone (median of {len(alone)}): {alone_s:.2f} s")
        print(f"one run under load (median): {under_load:.2f} s = {under_load / alone_s:.2f}x alone")
        print(
            f"soak wall: {soak_wall:.1f} s = {soak_wall / args.runs:.2f} s per run = "
            f"{soak_wall / args.runs / alone_s:.2f}x one run alone"
        )
    finally:
        stop_server(proc)
        for stop in services:
            stop()


if __name__ == "__main__":
    main()
