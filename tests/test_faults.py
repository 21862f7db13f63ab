"""Faults produced for real between the stage and its tracking server (a proxy that answers 5xx
or goes away mid-run): bounded retries, then a clean failure: exit 1, the run FAILED, no version
without its artifacts, no alias moved."""

from __future__ import annotations

import time

import mlflow
import pytest

from tests import helpers
from tests.faultproxy import SOURCE, FaultProxy, Rule
from tests.figures import add
from tests.helpers import digits_manifest

NAME = "digits-faults"
TEXT = digits_manifest(NAME)


@pytest.fixture
def proxy(mlflow_server, monkeypatch):
    # keep MLflow's own retries short so the test is quick; the stage's bound is the same shape
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    p = FaultProxy(mlflow_server)
    yield p
    p.close()


@pytest.fixture(scope="module")
def baseline_version(digits_source, tmp_path_factory):
    """A good version 1 holding the alias, so we can see that failures never move it."""
    folder = tmp_path_factory.mktemp("faults")
    assert helpers.run_stage(folder, helpers.write_manifest(folder, TEXT)).exit_code == 0
    assert mlflow.MlflowClient().get_model_version_by_alias(NAME, "prod").version == "1"
    return "1"


CASES = {
    "5xx on every artifact upload": [Rule("PUT", r"/mlflow-artifacts/artifacts/", "500")],
    "5xx on creating the version": [Rule("POST", r"/model-versions/create$", "500", body=SOURCE)],
    "5xx on moving the alias": [Rule("POST", r"/registered-models/alias$", "500")],
    # Down for 8 s: longer than MLflow's own retries of the request (2 retries, about 3 s), shorter
    # than the stage's cleanup clock (half the outage bound), so the cleanup finds the server back.
    "server restarts during registration": [Rule("POST", r"/model-versions/create$", "outage", seconds=8, times=1, body=SOURCE)],
    "server restarts while moving the alias": [Rule("POST", r"/registered-models/alias$", "outage", seconds=8, times=1)],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fault_mid_run_fails_cleanly(case, proxy, baseline_version, tmp_path, run_stage, manifest, versions_of):
    proxy.rules = CASES[case]
    # a different chain each time, so the run cannot reuse version 1
    path = manifest(TEXT.replace("{mode: dynamic}", "{mode: float16}"))
    start = time.monotonic()
    result = run_stage(path, "--tracking-uri", proxy.uri)
    elapsed = time.monotonic() - start
    add("faults injected")
    assert any(rule.hits for rule in proxy.rules), (proxy.log[-5:], result.output)
    assert result.exit_code == 1, result.output
    assert "\nerror: " in "\n" + result.stderr and "Traceback" not in result.stderr
    assert elapsed < 120
    client = mlflow.MlflowClient()  # straight to the server, not through the proxy
    versions = versions_of(NAME)
    add("versions lost", 0 if all(v.status == "READY" for v in versions) else 1)
    assert [v.version for v in versions] == ["1"], [(v.version, v.status) for v in versions]
    holder = client.get_model_version_by_alias(NAME, "prod").version
    add("wrong promotions", int(holder != baseline_version))
    assert holder == baseline_version
    report = result.report
    assert report["error"]
    assert client.get_run(report["run_id"]).info.status == "FAILED"
    add("faults survived")


def test_a_rollback_that_fails_says_so(proxy, baseline_version, tmp_path, monkeypatch, run_stage, manifest, versions_of):
    """The alias move fails and so does every undo (the server answers 5xx to the alias and to the
    version's deletion until the cleanup clock is spent): the error says what was left, in notes
    under it, and the log says it too; the alias never moved."""
    monkeypatch.setenv("PIPELINE_STAGE_OUTAGE_BOUND_S", "5")
    proxy.rules = [Rule("POST", r"/registered-models/alias$", "500"), Rule("DELETE", r"/model-versions/delete$", "500")]
    path = manifest(TEXT.replace("{mode: dynamic}", "{mode: float16}"))
    result = run_stage(path, "--tracking-uri", proxy.uri)
    assert result.exit_code == 1, result.output
    assert proxy.rules[0].hits, proxy.log[-8:]
    assert "note: rollback failed: could not put alias `prod` back on version 1" in result.stderr, result.stderr
    assert "note: rollback failed: could not delete the half-made version digits-faults/" in result.stderr
    client = mlflow.MlflowClient()  # straight to the server
    assert client.get_model_version_by_alias(NAME, "prod").version == baseline_version
    left = [v for v in versions_of(NAME) if v.version != baseline_version]
    assert len(left) == 1 and left[0].status == "READY" and not left[0].aliases  # what the notes name, never promoted
    proxy.rules = []
    client.delete_model_version(NAME, left[0].version)  # the operator's cleanup the notes ask for
