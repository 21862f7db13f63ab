"""The stage as KFP v2 components and pipelines, run end to end with kfp.local against the real
MLflow server; and the checked-in compiled YAML is what the code compiles to."""

from __future__ import annotations

import hashlib
from pathlib import Path

import mlflow
import pytest

from tests.helpers import REPO, kfp_manifest


@pytest.fixture(scope="module")
def kfp_local(tmp_path_factory, mlflow_server):
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path_factory.mktemp("kfp-root")))
    return local


def test_compiled_yaml_is_up_to_date(tmp_path):
    from pipeline_stage.kfp_components import COMPILED, compile_all

    compile_all(str(tmp_path))
    for name in COMPILED:
        checked_in = REPO / "manifests" / "kfp" / name
        assert checked_in.read_text() == (tmp_path / name).read_text(), (
            f"{checked_in} is stale: run `python -m pipeline_stage.kfp_components manifests/kfp`"
        )


def test_component_interface():
    from pipeline_stage.kfp_components import optimize_tflite

    spec = optimize_tflite.component_spec
    assert set(spec.inputs) == {"manifest", "model_uri", "tracking_uri", "stage_version"}
    assert {n: o.type for n, o in spec.outputs.items()} == {
        "tflite": "system.Model@0.0.1",
        "metrics": "system.Metrics@0.0.1",
        "report": "system.Markdown@0.0.1",
        "report_html": "system.HTML@0.0.1",
        "compiled": "system.Artifact@0.0.1",
        "passed": "Boolean",
        "model_version": "String",
        "registered_model": "String",
    }
    from pipeline_stage import __version__

    assert spec.inputs["stage_version"].default == __version__
    # credentials are never parameters
    assert not any(word in name for name in spec.inputs for word in ("token", "password", "secret"))


def test_optimize_component_outputs(kfp_local, digits_source):
    from pipeline_stage.kfp_components import optimize_tflite

    task = optimize_tflite(manifest=kfp_manifest("digits-kfp-task"), model_uri="models:/digits-cnn@champion")
    assert task.outputs["passed"] is True and task.outputs["model_version"] == "1"
    model = task.outputs["tflite"]
    assert model.metadata["registered_name"] == "digits-kfp-task" and model.metadata["registered_version"] == "1"
    assert Path(model.path).read_bytes()[4:8] == b"TFL3"
    # the artifact's digest is its file's, and the registered version records the same
    assert model.metadata["sha256"] == hashlib.sha256(Path(model.path).read_bytes()).hexdigest()
    assert model.metadata["size_bytes"] == Path(model.path).stat().st_size
    tags = mlflow.MlflowClient().get_model_version("digits-kfp-task", "1").tags
    assert tags["pipeline_stage.sha256.model/artifacts/model.tflite"].split()[0] == model.metadata["sha256"]
    assert model.metadata["files_sha256"]["model/MLmodel"] == tags["pipeline_stage.sha256.model/MLmodel"].split()[0]
    metrics = task.outputs["metrics"].metadata
    assert metrics["gate.accuracy.max_drop"] == 1.0 and metrics["size_bytes"] < metrics["baseline.size_bytes"]
    assert "## Gates" in Path(task.outputs["report"].path).read_text()
    assert "<img class='plot'" in Path(task.outputs["report_html"].path).read_text()


def test_failed_gate_is_an_output_not_a_crash(kfp_local, digits_source):
    from pipeline_stage.kfp_components import optimize_tflite

    task = optimize_tflite(manifest=kfp_manifest("digits-kfp-fail", max_ratio=0.01), model_uri="models:/digits-cnn@champion")
    assert task.outputs["passed"] is False and task.outputs["model_version"] == ""
    assert task.outputs["metrics"].metadata["gate.size_bytes.max_ratio"] == 0.0


def test_train_optimize_promote_pipeline(kfp_local, mlflow_server):
    from pipeline_stage.kfp_components import train_optimize_promote

    train_optimize_promote(
        manifest=kfp_manifest("digits-kfp-p1"), alias="production-edge", epochs=6, source_model="digits-kfp-source"
    )
    client = mlflow.MlflowClient()
    promoted = client.get_model_version_by_alias("digits-kfp-p1", "production-edge")
    assert promoted.version == "1" and promoted.tags["pipeline_stage.passed"] == "true"
    assert promoted.tags["source.name"] == "digits-kfp-source"
    # a failing manifest: the If branch is skipped and no alias exists
    train_optimize_promote(
        manifest=kfp_manifest("digits-kfp-p1-fail", max_ratio=0.01), epochs=6, source_model="digits-kfp-source"
    )
    assert client.search_model_versions("name='digits-kfp-p1-fail'") == []


def test_fan_out_pipeline_promotes_the_best_passing_candidate(kfp_local, digits_source):
    from pipeline_stage.kfp_components import fan_out_optimize

    manifests = [kfp_manifest("digits-kfp-fan", mode) for mode in ("float16", "int8")]
    manifests.append(kfp_manifest("digits-kfp-fan", "int8", max_ratio=0.01))  # fails its gate
    fan_out_optimize(model_uri="models:/digits-cnn@champion", manifests=manifests, objective="size_bytes")
    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name='digits-kfp-fan'")
    assert len(versions) == 2  # the failing candidate registered nothing
    promoted = client.get_model_version_by_alias("digits-kfp-fan", "production-edge")
    sizes = {v.version: float(v.tags["metric.size_bytes"]) for v in versions}
    assert promoted.version == min(sizes, key=sizes.get)
    assert promoted.tags["source.version"] == digits_source["version"]  # the alias was pinned to a version
