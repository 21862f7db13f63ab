"""Every registered file is checkable: digests recorded on the version, the run, the report; a
stored copy altered afterwards (a byte flipped in the S3 object itself) is refused by `verify`, by
the pyfunc's load, by `promote`, and by the stage's own reuse of an earlier version."""

from __future__ import annotations

import hashlib
from pathlib import Path

import mlflow
import pytest

from pipeline_stage.contract.errors import IntegrityError
from pipeline_stage.kfp_support import promote
from tests import helpers
from tests.figures import add

TEXT = (
    "model: models:/digits-cnn@champion\n"
    "data: {evaluation: 'runs:/${source.run_id}/data/eval.npz'}\n"
    "chain:\n  - quantize: {mode: dynamic}\n"
    "gates:\n  - {metric: accuracy, max_drop: 0.02}\n"
    "register: {name: NAME, alias: prod}\n"
)


def _register(folder: Path, name: str, tag: str, *args: str) -> dict:
    path = helpers.write_manifest(folder, TEXT.replace("NAME", name), name=f"{tag}.yaml")
    result = helpers.run_stage(folder, path, *args)
    assert result.exit_code == 0, result.output
    return result.report


def _flip(s3, key_suffix: str, keys_containing: str, offset: int) -> list[str]:
    """Flip one byte of every stored object whose key ends with `key_suffix` and contains
    `keys_containing`; the keys changed."""
    client = s3.client()
    changed = []
    for bucket in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith(key_suffix) and keys_containing in obj["Key"]:
                    body = bytearray(client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
                    body[offset] ^= 0x01
                    client.put_object(Bucket=bucket, Key=obj["Key"], Body=bytes(body))
                    changed.append(obj["Key"])
    return changed


@pytest.fixture(scope="module")
def registered(digits_source, mlflow_server, tmp_path_factory):
    return _register(tmp_path_factory.mktemp("integrity"), "digits-integrity", "first")


def test_digests_are_recorded_everywhere_and_untouched_files_verify(registered, tmp_path, run_cli):
    client = mlflow.MlflowClient()
    reg = registered["registered"]
    files = {f["path"]: f for f in registered["artifacts"]}
    assert {"run/tflite/model.tflite", "model/artifacts/model.tflite", "model/MLmodel", "model/pyfunc_model.py"} <= set(files)
    assert "model/code/litert_runtime.py" in files
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=reg["tflite_uri"], dst_path=str(tmp_path)))
    assert files["run/tflite/model.tflite"]["sha256"] == hashlib.sha256(local.read_bytes()).hexdigest()
    assert files["run/tflite/model.tflite"]["sha256"] == files["model/artifacts/model.tflite"]["sha256"]
    tags = client.get_model_version(reg["name"], reg["version"]).tags
    run_tags = client.get_run(registered["run_id"]).data.tags
    for path, f in files.items():
        assert tags[f"pipeline_stage.sha256.{path}"] == f"{f['sha256']} {f['size']}"
    assert run_tags["pipeline_stage.sha256.run/tflite/model.tflite"] == tags["pipeline_stage.sha256.run/tflite/model.tflite"]
    for uri in (reg["uri"], f"models:/{reg['name']}@prod", f"runs:/{registered['run_id']}"):
        result = run_cli("verify", uri)
        assert result.returncode == 0, result.stderr
        assert ": ok (" in result.stdout
    assert mlflow.pyfunc.load_model(reg["uri"]) is not None


@pytest.mark.parametrize(
    "stored, contains, offset",
    [
        ("model.tflite", "", 100),  # the flatbuffer: the logged model's copy and the run's
        ("code/litert_runtime.py", "", 3),  # a letter of the module docstring: it still imports
    ],
    ids=["tflite", "code"],
)
def test_an_altered_stored_file_is_refused_by_verify_the_pyfunc_and_promote(
    stored, contains, offset, digits_source, mlflow_server, s3, tmp_path, run_cli
):
    name = f"digits-tampered-{stored.split('/')[0].split('.')[0]}"
    report = _register(tmp_path, name, "base", "--new-version")
    reg = report["registered"]
    mv = mlflow.MlflowClient().get_model_version(name, reg["version"])
    model_id = mv.model_id or mv.source.rsplit("/", 1)[-1]  # models:/m-<id>
    run_id = report["run_id"]
    changed = _flip(s3, stored, model_id, offset)
    if stored == "model.tflite":
        changed += _flip(s3, "tflite/model.tflite", run_id, offset)
    assert changed, "no stored object was altered"
    add("stored files altered")

    result = run_cli("verify", reg["uri"])
    assert result.returncode == 2, result.stdout + result.stderr
    recorded = {f["path"]: f["sha256"] for f in report["artifacts"]}
    altered = [p for p in recorded if p.endswith(stored)]
    for path in altered:  # each file named, with both digests
        assert path in result.stderr and recorded[path] in result.stderr, result.stderr
    assert "Traceback" not in result.stderr

    with pytest.raises(Exception, match="does not match what pipeline-stage registered"):
        mlflow.pyfunc.load_model(reg["uri"])
    with pytest.raises(IntegrityError, match="refusing to promote"):
        promote(name, reg["version"], "edge", mlflow_server)
    assert "edge" not in (mlflow.MlflowClient().get_registered_model(name).aliases or {})
    add("altered files refused")

    # the stage's reuse path: the altered version is not reused (and the alias is not moved to it)
    again = _register(tmp_path, name, "again")
    assert again["registered"]["reused"] is False and again["registered"]["version"] != reg["version"]
    assert again["registered"]["replaced"].startswith(reg["uri"])
    assert mlflow.MlflowClient().get_model_version_by_alias(name, "prod").version == again["registered"]["version"]
