"""`delegates`: per-target coverage from op-set rules, a measured XNNPACK benchmark, the plan
embedded in the .tflite and tagged on the version, and gates on coverage."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow

from pipeline_stage.engine.flatbuffer import read

BASE = (
    "model: models:/digits-cnn@champion\n"
    "data: {calibration: 'runs:/${source.run_id}/data/calib.npz', evaluation: 'runs:/${source.run_id}/data/eval.npz'}\n"
    "chain:\n  - quantize: {mode: int8}\n  - delegates: {targets: [xnnpack, gpu, nnapi, edgetpu], runs: 50}\n"
)


def test_plan_is_embedded_tagged_and_explains_what_stays_on_cpu(digits_source, tmp_path, run_stage, manifest):
    text = BASE + (
        "gates:\n  - {metric: delegate_coverage.xnnpack, min: 0.5}\nregister: {name: digits-delegates, alias: planned}\n"
    )
    result = run_stage(manifest(text))
    assert result.exit_code == 0, result.output
    report = result.report
    notes = report["steps"][1]["notes"]
    assert set(notes["targets"]) == {"xnnpack", "gpu", "nnapi", "edgetpu"}
    edgetpu = notes["targets"]["edgetpu"]
    # the converted model keeps a dynamic batch dimension: an Edge TPU cannot take those nodes
    assert edgetpu["coverage"] < 1 and any("dynamic dimension" in r for r in edgetpu["blockers"])
    assert notes["targets"]["xnnpack"]["coverage"] >= 0.5
    bench = notes["xnnpack_benchmark"]
    assert bench["p50_ms_with"] > 0 and bench["p50_ms_without"] > 0 and bench["speedup"] > 0
    assert any(f.startswith("edgetpu:") for f in notes["findings"])
    embedded = json.loads(read(result.model_bytes).metadata["pipeline_stage.delegate_plan"])
    assert embedded["targets"] == notes["targets"]
    reg = report["registered"]
    tags = mlflow.MlflowClient().get_model_version(reg["name"], reg["version"]).tags
    assert float(tags["delegate.edgetpu.coverage"]) == edgetpu["coverage"]
    assert report["candidate"]["delegate_coverage.xnnpack"] == notes["targets"]["xnnpack"]["coverage"]


def test_a_gate_can_require_a_target(digits_source, tmp_path, run_stage, manifest):
    text = BASE + "gates:\n  - {metric: delegate_coverage.edgetpu, min: 1.0}\nregister: {name: digits-edgetpu-only}\n"
    result = run_stage(manifest(text))
    assert result.exit_code == 3, result.output
    assert "delegate_coverage.edgetpu min 1.0" in result.stderr
    assert mlflow.MlflowClient().search_model_versions("name='digits-edgetpu-only'") == []


def test_analyze_reports_ops_sizes_and_per_layer_error(digits_source, tmp_path, run_stage, manifest):
    text = (
        "model: models:/digits-cnn@champion\n"
        "data: {calibration: 'runs:/${source.run_id}/data/calib.npz', evaluation: 'runs:/${source.run_id}/data/eval.npz'}\n"
        "chain:\n  - quantize: {mode: int8}\n  - analyze: {samples: 20, top: 3}\n"
    )
    result = run_stage(manifest(text))
    assert result.exit_code == 0, result.output
    report = result.report
    notes = report["steps"][1]["notes"]
    assert notes["op_histogram"] == report["conversion"]["flatbuffer"]["ops"]
    assert notes["weight_bytes_by_dtype"]["INT8"] > notes["weight_bytes_by_dtype"]["INT32"]
    layers = notes["per_layer"]
    assert len(layers) == 3 and layers[0]["rmse/scale"] >= layers[-1]["rmse/scale"] >= 0
    assert {"op", "tensor", "max_abs_error", "scale"} <= set(layers[0])
    stats = mlflow.artifacts.download_artifacts(run_id=report["run_id"], artifact_path="steps/1-analyze/layer_stats.csv")
    assert Path(stats).read_text().startswith("op,tensor,rmse/scale,")
    # analysis changes nothing
    assert report["steps"][1]["metrics"]["size_bytes"] == report["steps"][0]["metrics"]["size_bytes"]
