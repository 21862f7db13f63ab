"""Many stages at once, as real processes against a real server (PostgreSQL + S3; sqlite on request):
nothing lost, no live sibling's run ended, identical stages keep one version, and a stage killed
with SIGKILL becomes an orphan only once its run lease has lapsed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest

from pipeline_stage.mlflow_io.stage_run import LEASE_TAG
from tests.figures import add
from tests.helpers import read_report
from tests.services import start_mlflow_server, stop_server

EXE = str(Path(sys.executable).with_name("pipeline-stage"))
STAGES = 8


def _text(name: str, experiment: str) -> str:
    return (
        "model: models:/digits-cnn@champion\n"
        "data: {evaluation: 'runs:/${source.run_id}/data/eval.npz'}\n"
        f"experiment: {experiment}\n"
        "chain:\n  - quantize: {mode: dynamic}\n"
        "gates:\n  - {metric: accuracy, max_drop: 0.02}\n"
        f"register: {{name: {name}, alias: prod}}\n"
    )


def _stage(path: Path, uri: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    report = path.with_name(f"{path.stem}-{time.monotonic_ns()}.json")
    proc = subprocess.Popen(
        [EXE, "run", str(path), "-q", "--report", str(report), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, **(env or {})},
        start_new_session=True,
    )
    proc.report = report
    return proc


def _all_at_once(path: Path, uri: str, n: int, *args: str) -> list[tuple[int, str, dict]]:
    procs = [_stage(path, uri, *args) for _ in range(n)]
    with ThreadPoolExecutor(n) as pool:
        outs = list(pool.map(lambda p: p.communicate(timeout=900), procs))
    return [(p.returncode, err, read_report(p.report) if p.report.exists() else {}) for p, (_, err) in zip(procs, outs)]


@pytest.fixture(scope="module")
def sqlite_server(tmp_path_factory, digits_model, digits_data):
    """A server on the embedded default's store (sqlite, artifacts in a folder), with the digits source."""
    from pipeline_stage.demo import log_source_model

    proc, uri = start_mlflow_server(tmp_path_factory.mktemp("sqlite-server"))
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        log_source_model(digits_model, digits_data)
    finally:
        mlflow.set_tracking_uri(before)
    yield uri
    stop_server(proc)


# The stores these tests run on: PostgreSQL + S3 (production's shape) by default; a sqlite server
# too with PIPELINE_STAGE_TEST_CONCURRENCY_STORES=postgres+s3,sqlite (about two minutes more).
STORES = os.environ.get("PIPELINE_STAGE_TEST_CONCURRENCY_STORES", "postgres+s3").split(",")


@pytest.fixture(params=STORES)
def server(request, digits_source, mlflow_server):
    """The session's server (asked for here, not lazily: its MLFLOW_TRACKING_URI must be set before
    the per-test fixtures that restore it start), or the sqlite one."""
    return request.getfixturevalue("sqlite_server") if request.param == "sqlite" else mlflow_server


def test_eight_stages_at_once_lose_nothing(server, tmp_path, manifest):
    """Same source, same chain, one target name, --new-version: every stage exits 0 and leaves a
    READY, tagged version; the alias is on the newest; no run was ended by a sibling."""
    name = f"digits-eight-{tmp_path.name[-12:]}"
    path = manifest(_text(name, f"eight-{tmp_path.name[-12:]}"))
    results = _all_at_once(path, server, STAGES, "--new-version")
    add("concurrent runs", STAGES)
    assert [code for code, _, _ in results] == [0] * STAGES, [err[-600:] for code, err, _ in results if code]
    client = mlflow.MlflowClient(tracking_uri=server, registry_uri=server)
    versions = client.search_model_versions(f"name='{name}'")
    lost = STAGES - sum(
        v.status == "READY" and v.tags.get("pipeline_stage.passed") == "true" and "pipeline_stage.sha256.model/MLmodel" in v.tags
        for v in versions
    )
    add("versions lost", lost)
    assert lost == 0 and len(versions) == STAGES, [(v.version, v.status) for v in versions]
    newest = max(int(v.version) for v in versions)
    assert client.get_model_version_by_alias(name, "prod").version == str(newest)
    runs = [client.get_run(r["run_id"]) for _, _, r in results]
    wrongly_ended = sum(bool(r["ended_orphans"]) for _, _, r in results if "ended_orphans" in r) + sum(
        run.info.status != "FINISHED" or "pipeline_stage.ended_by" in run.data.tags for run in runs
    )
    add("runs wrongly ended by a sibling", wrongly_ended)
    assert wrongly_ended == 0
    assert all(LEASE_TAG not in run.data.tags for run in runs)  # released when each run ended


def test_identical_stages_without_new_version_keep_one_version(digits_source, mlflow_server, tmp_path, manifest):
    """The rule for identical stages started together: the earliest version stays, the others
    delete theirs and report it reused (`registered.deduplicated` names the one they dropped)."""
    name = "digits-identical"
    path = manifest(_text(name, "identical"))
    results = _all_at_once(path, mlflow_server, 4)
    add("concurrent runs", 4)
    assert [code for code, _, _ in results] == [0] * 4, [err[-600:] for code, err, _ in results if code]
    client = mlflow.MlflowClient()
    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) == 1 and versions[0].status == "READY", [(v.version, v.status) for v in versions]
    kept = versions[0].version
    registered = [r["registered"] for _, _, r in results]
    assert {r["version"] for r in registered} == {kept}
    assert sum(not r["reused"] for r in registered) == 1
    assert all(r["reused"] for r in registered if r.get("deduplicated"))
    assert client.get_model_version_by_alias(name, "prod").version == kept


def test_a_killed_stage_becomes_an_orphan_only_once_its_lease_lapsed(server, tmp_path, monkeypatch, run_stage, manifest):
    """A stage killed with SIGKILL mid-run: a later stage of the same chain leaves its run alone
    while the lease holds, and ends it (FAILED, saying why) once the lease has expired."""
    experiment = f"lease-{tmp_path.name[-12:]}"
    path = manifest(_text(f"digits-lease-{tmp_path.name[-12:]}", experiment))
    client = mlflow.MlflowClient(tracking_uri=server, registry_uri=server)
    victim = _stage(path, server, env={"PIPELINE_STAGE_LEASE_S": "8"})
    run = None
    deadline = time.monotonic() + 300
    while run is None and time.monotonic() < deadline and victim.poll() is None:
        exp = client.get_experiment_by_name(experiment)
        found = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'") if exp else []
        run = found[0] if found else None
        time.sleep(0.2)
    assert run is not None and LEASE_TAG in run.data.tags, victim.communicate()[1][-1000:]
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()

    # while the lease holds (here: a skew margin of 10 minutes), the run is a live stage's
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.setenv("PIPELINE_STAGE_LEASE_SKEW_S", "600")
    first = run_stage(path, "--tracking-uri", server)
    assert first.exit_code == 0, first.output
    assert first.report["ended_orphans"] == []
    assert client.get_run(run.info.run_id).info.status == "RUNNING"

    # once the lease has expired (no margin), the next stage of the same chain ends it
    expiry = float(client.get_run(run.info.run_id).data.tags[LEASE_TAG])
    time.sleep(max(0.0, expiry - time.time()) + 0.5)
    monkeypatch.setenv("PIPELINE_STAGE_LEASE_SKEW_S", "0")
    later = run_stage(path, "--tracking-uri", server)
    assert later.exit_code == 0, later.output
    report = later.report
    assert report["ended_orphans"] == [run.info.run_id]
    orphan = client.get_run(run.info.run_id)
    assert orphan.info.status == "FAILED"
    assert orphan.data.tags["pipeline_stage.ended_by"] == report["run_id"]
    assert "lease expired" in orphan.data.tags["pipeline_stage.end_reason"]
    add("killed stages ended only after their lease lapsed")


def test_lease_rule(monkeypatch):
    """The sweep's rule, on its own: expiry plus the skew margin; a run without a lease (an older
    stage) by its start against the outage bound."""
    from pipeline_stage.mlflow_io.stage_run import lease_expired

    now = 1_000_000.0
    monkeypatch.delenv("PIPELINE_STAGE_LEASE_SKEW_S", raising=False)
    monkeypatch.delenv("PIPELINE_STAGE_OUTAGE_BOUND_S", raising=False)
    assert not lease_expired({LEASE_TAG: str(now - 10)}, None, now)  # within the 30 s margin
    assert lease_expired({LEASE_TAG: str(now - 31)}, None, now)
    assert not lease_expired({}, int((now - 30) * 1000), now)  # no lease, started 30 s ago (bound 60 s)
    assert lease_expired({}, int((now - 61) * 1000), now)
    assert lease_expired({LEASE_TAG: "not a time"}, None, now)
