"""The direct layout (`mlflow server --no-serve-artifacts --default-artifact-root s3://...`): the
stage reads and writes the object store itself, with boto3's credentials, against moto's S3 server
on loopback; and what it says when it cannot (no client, no bucket, access refused, no answer)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess

import mlflow
import numpy as np
import pytest

from pipeline_stage.mlflow_io.tracking import redact
from tests import helpers
from tests.helpers import pointed_at, read_report
from tests.services import BIN, S3_ENV, _wait, free_port, stop_server


@pytest.fixture(scope="module")
def local_source(tmp_path_factory, digits_model, digits_data):
    """The digits CNN and its evaluation data as local files (error cases fail before reading them)."""
    root = tmp_path_factory.mktemp("local-source")
    digits_model.save(root / "digits.keras")
    x, y = digits_data.evaluation
    np.savez(root / "eval.npz", x=x, y=y)
    return root


def _experiment(uri: str, name: str, artifact_location: str) -> None:
    client = mlflow.MlflowClient(uri)
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name, artifact_location=artifact_location)


def _run_statuses(uri: str, experiment: str) -> list[str]:
    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return [r.info.status for r in client.search_runs([found.experiment_id])]


@pytest.mark.slow
def test_direct_layout_reads_and_writes_the_bucket_itself(direct, tmp_path, versions_of, run_cli, manifest):
    """Source and data from `s3://direct`, the .tflite into it, digests checked by `verify`."""
    uri, s3 = direct
    path = manifest(
        **_sections(
            "models:/digits-direct@champion", "runs:/${source.run_id}/data/eval.npz", "direct-stage", "digits-direct-tflite"
        )
    )
    result = run_cli("run", str(path), "-q", "--report", str(tmp_path / "r.json"), env={**s3.env, "MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 0, result.stderr[-3000:]
    report = read_report(tmp_path / "r.json")
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="direct").get("Contents", [])]
    tflite = [k for k in keys if k.endswith(".tflite")]
    assert tflite, keys  # the stage wrote the model straight into the bucket
    body = s3.client().get_object(Bucket="direct", Key=tflite[0])["Body"].read()
    assert body[4:8] == b"TFL3"
    assert hashlib.sha256(body).hexdigest() in {d["sha256"] for d in report["artifacts"]}
    with pointed_at(uri):
        version = versions_of("digits-direct-tflite")[0]
    assert version.source.startswith("models:/") and report["registered"]["version"] == version.version
    checked = run_cli("verify", "models:/digits-direct-tflite@prod", "--tracking-uri", uri, env=s3.env)
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert "testing" not in result.stderr + checked.stderr + checked.stdout  # the keys are never printed


def _sections(model: str, data: str, experiment: str, name: str) -> dict:
    """The stage these tests run: `model` and its evaluation `data`, dynamic range, registered as `name`."""
    return dict(
        model=model,
        data={"evaluation": data},
        experiment=experiment,
        chain=[{"quantize": {"mode": "dynamic"}}],
        gates=[{"metric": "accuracy", "max_drop": 0.02}],
        register={"name": name, "alias": "prod"},
    )


def _refused(direct, local_source, manifest, experiment: str, location: str, env: dict | None = None):
    uri, s3 = direct
    _experiment(uri, experiment, location)
    path = manifest(
        **_sections(str(local_source / "digits.keras"), str(local_source / "eval.npz"), experiment, f"{experiment}-m")
    )
    result = helpers.run_cli("run", str(path), "-q", env={**s3.env, "MLFLOW_TRACKING_URI": uri, **(env or {})})
    assert _run_statuses(uri, experiment) == ["FAILED"]  # the run ended, saying so
    with pointed_at(uri):
        assert helpers.versions_of(f"{experiment}-m") == []  # nothing registered
    return result


@pytest.mark.slow
def test_no_such_bucket_is_bad_input_naming_it_and_the_credentials(direct, local_source, tmp_path, manifest):
    result = _refused(direct, local_source, manifest, "no-bucket", "s3://no-such-bucket/runs")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "S3 bucket s3://no-such-bucket does not exist" in result.stderr
    assert "credentials: environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)" in result.stderr
    assert "the stage run's artifact root" in result.stderr


@pytest.mark.slow
def test_a_store_that_does_not_answer_is_an_outage(direct, local_source, tmp_path, manifest):
    closed = f"http://127.0.0.1:{free_port()}"
    result = _refused(
        direct, local_source, manifest, "no-answer", "s3://direct/no-answer", env={"MLFLOW_S3_ENDPOINT_URL": closed}
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "S3 (s3://direct) did not answer" in result.stderr and "retry the step" in result.stderr


@pytest.mark.slow
def test_a_store_without_its_client_names_the_extra(direct, local_source, tmp_path, manifest):
    """This venv has no Azure client (the `azure` extra is not in `test`): a real missing client."""
    result = _refused(direct, local_source, manifest, "on-azure", "wasbs://runs@acct.blob.core.windows.net/x")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Azure Blob Storage" in result.stderr and "pip install 'pipeline-stage[azure]'" in result.stderr


@pytest.mark.slow
def test_access_refused_names_the_bucket_and_the_credential_source(direct, local_source, tmp_path, manifest):
    """A second moto server that checks IAM (INITIAL_NO_AUTH_ACTION_COUNT): the first three
    requests make a user with no policy, its key and a bucket; the stage then uses that key."""
    import boto3

    port = free_port()
    env = {**os.environ, **S3_ENV, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=open(tmp_path / "moto-iam.log", "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        _wait(lambda: _listening(port), "moto_server (IAM)", proc, tmp_path / "moto-iam.log")
        kw = dict(
            endpoint_url=endpoint,
            region_name="us-east-1",
            **{k.lower(): S3_ENV[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
        )
        iam = boto3.client("iam", **kw)
        iam.create_user(UserName="stage")
        key = iam.create_access_key(UserName="stage")["AccessKey"]
        boto3.client("s3", **kw).create_bucket(Bucket="locked")
        result = _refused(
            direct,
            local_source,
            manifest,
            "locked",
            "s3://locked/runs",
            env={
                "MLFLOW_S3_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            },
        )
    finally:
        stop_server(proc)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "S3 refused access to s3://locked" in result.stderr and "AccessDenied" in result.stderr
    assert "credentials: environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)" in result.stderr
    assert key["SecretAccessKey"] not in result.stderr


def _listening(port: int) -> bool:
    """Whether the port accepts connections (an HTTP request would count as one of the free actions)."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize(
    "url",
    [
        "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIAX%2F2026&X-Amz-Signature=abc123&X-Amz-Security-Token=t0k",
        "https://storage.googleapis.com/b/k?X-Goog-Algorithm=GOOG4&X-Goog-Credential=sa%40p&X-Goog-Signature=abc123",
        "https://acct.blob.core.windows.net/c/k?sv=2024-11-04&se=2026&sp=r&sig=abc123%3D",
    ],
)
def test_signed_urls_are_redacted(url):
    shown = redact(f"error fetching {url} (403)")
    assert "abc123" not in shown and "AKIAX" not in shown and "t0k" not in shown and "sa%40p" not in shown
    assert shown.startswith("error fetching https://") and shown.endswith(" (403)")


@pytest.mark.parametrize(
    ("raised", "exit_code", "words"),
    [
        ("Forbidden('GET .../b/team-models/o: caller lacks storage.objects.list')", 2, "refused access to gs://team-models"),
        ("NotFound('GET .../b/team-models: The specified bucket does not exist.')", 2, "bucket gs://team-models does not exist"),
        ("ServiceUnavailable('backend error')", 1, "Google Cloud Storage (gs://team-models) did not answer"),
    ],
)
def test_gcs_errors_are_classified_by_the_clients_own_types(raised, exit_code, words, monkeypatch):
    """No GCS emulator runs here: the exceptions google-cloud-storage raises, built as it builds
    them, raised under an MLflow-style wrapper as the probe meets them."""
    from google.api_core import exceptions

    from pipeline_stage.mlflow_io.object_store import store_error

    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    try:
        try:
            raise eval(raised, vars(exceptions))
        except Exception as inner:
            raise RuntimeError("Failed to list artifacts") from inner
    except RuntimeError as exc:
        found = store_error(exc, "listing the stage run's artifact root", uri="gs://team-models/1/artifacts")
    assert found is not None and found.exit_code == exit_code and words in str(found), str(found)
    if exit_code == 2:
        assert "credentials: Application Default Credentials" in str(found)
