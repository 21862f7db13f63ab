"""The stage's round trips to the tracking server (issue 22, item 7): a real proxy in front of the
session's real server (PostgreSQL + S3) counts every request a run makes; the metrics queued by
StageRun reach the run (and the logged model) in one batch, on success and on failure."""

from __future__ import annotations

import time
from collections import Counter

import mlflow
import pytest

from tests.faultproxy import FaultProxy, Rule
from tests.helpers import digits_manifest

# What the first run of digits_manifest from the registry makes (its experiment and registered
# model created), measured: 73 requests; 93 before the round trips were cut (9 metric histories
# read back to link the metrics to the logged model, 9 log-batches, the source's URI resolved
# three times, the run ended twice). Room for a few more, not for a request per metric again.
BUDGET = 78


@pytest.fixture
def proxy(mlflow_server):
    p = FaultProxy(mlflow_server)
    yield p
    p.close()


def _calls(proxy: FaultProxy) -> Counter:
    return Counter((method, path.split("?", 1)[0].replace("/api/2.0/mlflow", "")) for method, path, _ in proxy.log)


def test_a_run_from_the_registry_makes_only_the_round_trips_it_needs(digits_source, proxy, tmp_path, run_stage, manifest):
    path = manifest(digits_manifest("digits-round-trips"))
    result = run_stage(path, "--tracking-uri", proxy.uri, "--new-version")
    assert result.exit_code == 0, result.output
    calls = _calls(proxy)
    assert calls[("GET", "/metrics/get-history")] == 0, calls
    # params at the start; MLflow's own log-model history tag; the metrics, linked to the logged
    # model; the closing tags (verdict, digests) as the run ends
    assert calls[("POST", "/runs/log-batch")] == 4, calls
    assert calls[("GET", "/model-versions/get-download-uri")] == 1, calls  # the source's files, found once
    assert calls[("POST", "/runs/update")] == 1, calls  # the run ended once
    assert len(proxy.log) <= BUDGET, (len(proxy.log), calls)

    report = result.report
    client = mlflow.MlflowClient()
    run = client.get_run(report["run_id"])
    assert run.info.status == "FINISHED"
    assert {"accuracy", "baseline.accuracy", "size_bytes"} <= set(run.data.metrics), run.data.metrics
    assert run.data.tags["pipeline_stage.passed"] == "true"
    assert any(k.startswith("pipeline_stage.sha256.") for k in run.data.tags)
    model_id = report["registered"]["model_uri"].removeprefix("models:/")
    linked = {m.key: m.value for m in client.get_logged_model(model_id).metrics or []}
    assert linked["accuracy"] == run.data.metrics["accuracy"]
    assert linked["baseline.accuracy"] == run.data.metrics["baseline.accuracy"]


def test_metrics_measured_before_a_failure_still_reach_the_run(digits_source, proxy, tmp_path, run_stage, manifest):
    # the run's .tflite upload is refused: the stage fails after the baseline and the candidate were
    # measured, before anything was linked to a logged model
    proxy.rules = [Rule("PUT", r"/mlflow-artifacts/artifacts/.*/tflite/model\.tflite$", "500")]
    path = manifest(digits_manifest("digits-round-trips-fail").replace("{mode: dynamic}", "{mode: float16}"))
    result = run_stage(path, "--tracking-uri", proxy.uri)
    assert result.exit_code == 1, result.output
    assert proxy.rules[0].hits
    run = mlflow.MlflowClient().get_run(result.report["run_id"])
    assert run.info.status == "FAILED"
    assert {"accuracy", "baseline.accuracy"} <= set(run.data.metrics), run.data.metrics


def test_a_gate_that_fails_leaves_its_metrics_and_verdict_on_the_run(digits_source, proxy, tmp_path, run_stage, manifest):
    text = digits_manifest("digits-round-trips-gate").replace(
        "{metric: accuracy, max_drop: 0.02}", "{metric: size_bytes, max_ratio: 0.01}"
    )
    path = manifest(text)
    result = run_stage(path, "--tracking-uri", proxy.uri)
    assert result.exit_code == 3, result.output
    run = mlflow.MlflowClient().get_run(result.report["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["pipeline_stage.passed"] == "false"
    assert {"accuracy", "baseline.accuracy"} <= set(run.data.metrics)
    assert _calls(proxy)[("GET", "/metrics/get-history")] == 0


def test_a_lease_knows_whether_it_could_have_lapsed(mlflow_server):
    from pipeline_stage.mlflow_io.stage_run import Lease

    # renewals that never reach a server (nothing listens on port 9): once the expiry the run
    # started with has passed, a sibling may have taken the run for gone
    dead = mlflow.MlflowClient(tracking_uri="http://127.0.0.1:9")
    expiry = time.time() + 0.5
    lease = Lease(dead, "0" * 32, 0.6, expiry)
    try:
        while time.time() <= expiry:
            time.sleep(0.1)
        assert lease.may_have_lapsed()
    finally:
        lease.stop()
    # a lease far from its expiry, never renewed yet: no sibling could have ended the run
    live = Lease(mlflow.MlflowClient(), "0" * 32, 600.0, time.time() + 600.0)
    try:
        assert not live.may_have_lapsed()
    finally:
        live.stop()
