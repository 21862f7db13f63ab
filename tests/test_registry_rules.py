"""Retries and concurrency: a re-run reuses its version; concurrent stages leave every version
complete and the alias where the documented rule says."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow

from tests.figures import add


def _text(name: str, mode: str, *, alias: str = "edge", priority: int = 0, max_ratio: float = 0.9) -> str:
    return (
        "model: models:/digits-cnn@champion\n"
        "data: {calibration: 'runs:/${source.run_id}/data/calib.npz', evaluation: 'runs:/${source.run_id}/data/eval.npz'}\n"
        f"chain:\n  - quantize: {{mode: {mode}}}\n"
        f"gates:\n  - {{metric: accuracy, max_drop: 0.02}}\n  - {{metric: size_bytes, max_ratio: {max_ratio}}}\n"
        f"register: {{name: {name}, alias: {alias}, priority: {priority}}}\n"
    )


def test_rerun_reuses_the_version_and_new_version_flag_forces_one(digits_source, tmp_path, run_stage, manifest, versions_of):
    path = manifest(_text("digits-retry", "dynamic"))
    first = run_stage(path)
    again = run_stage(path)
    assert first.exit_code == 0 and again.exit_code == 0, again.output
    r1, r2 = first.report, again.report
    assert r2["registered"]["reused"] is True and r2["registered"]["version"] == r1["registered"]["version"] == "1"
    assert len(versions_of("digits-retry")) == 1
    forced = run_stage(path, "--new-version")
    assert forced.exit_code == 0
    assert forced.report["registered"]["version"] == "2"
    # a different chain is a different result
    other = manifest(_text("digits-retry", "float16"), name="other.yaml")
    assert run_stage(other).exit_code == 0
    assert len(versions_of("digits-retry")) == 3
    assert mlflow.MlflowClient().get_model_version_by_alias("digits-retry", "edge").version == "3"


def test_concurrent_stages_keep_every_version_and_the_alias_follows_the_rule(
    digits_source, tmp_path, mlflow_server, manifest, versions_of
):
    """Four stages at once into one model name (separate processes, as separate pods would be):
    two int8 with priority 1, one float16 with priority 0, one that fails its gate."""
    jobs = [("int8", 1, 0.9), ("int8-io", 1, 0.9), ("float16", 0, 0.9), ("dynamic", 5, 0.01)]
    paths = []
    for i, (mode, priority, ratio) in enumerate(jobs):
        text = _text("digits-concurrent", mode.split("-")[0], priority=priority, max_ratio=ratio)
        if mode == "int8-io":
            text = text.replace("{mode: int8}", "{mode: int8, io: int8}")
        paths.append(manifest(text, name=f"c{i}.yaml"))
    exe = str(Path(sys.executable).with_name("pipeline-stage"))

    def run(path):
        return subprocess.run(
            [exe, "run", str(path), "-q", "--report", str(path.with_suffix(".json"))],
            capture_output=True,
            text=True,
            env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server},
            timeout=600,
        )

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, paths))
    assert [r.returncode for r in results] == [0, 0, 0, 3], [r.stderr[-500:] for r in results]
    client = mlflow.MlflowClient()
    versions = versions_of("digits-concurrent")
    assert len(versions) == 3  # the failing stage registered nothing
    lost = 0
    for mv in versions:
        ok = mv.status == "READY" and mv.tags.get("pipeline_stage.passed") == "true"
        local = mlflow.artifacts.download_artifacts(artifact_uri=mv.tags["tflite_artifact"])
        ok = ok and Path(local).read_bytes()[4:8] == b"TFL3"
        ok = ok and mlflow.pyfunc.load_model(f"models:/digits-concurrent/{mv.version}") is not None
        lost += not ok
    holder = client.get_model_version_by_alias("digits-concurrent", "edge")
    expected = max((v for v in versions if v.tags["pipeline_stage.priority"] == "1"), key=lambda v: int(v.version))
    wrong = int(holder.version != expected.version)
    add("concurrent runs", len(jobs))
    add("versions lost", lost)
    add("wrong promotions", wrong)
    assert lost == 0 and wrong == 0, (holder.version, expected.version)
