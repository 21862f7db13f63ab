"""The LiteRT Quantizer as a first-class engine, on models of the project's own.

The main subject is a float .tflite with one input and three outputs that share a trunk
(`pipeline_stage.demo.build_wide_range_trunk`): one input feature is on a scale 30,000 times the
others, so every recipe that quantizes activations (full int8, dynamic, int16x8) fails a 20 dB
fidelity gate on every output, while weight-only and float16 recipes keep them float. Fidelity is
checked independently here with the LiteRT interpreter against the float .tflite.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline_stage.engine.flatbuffer import read as read_flatbuffer
from tests.helpers import demo_tflite_case, signature_outputs, sqnr_db

FIDELITY_GATE = "  - {metric: fidelity_sqnr_db, min: 20}\n"


@pytest.fixture(scope="module")
def trunk(tmp_path_factory) -> dict:
    from pipeline_stage.demo import build_wide_range_trunk

    folder = tmp_path_factory.mktemp("trunk")
    case = demo_tflite_case(folder, "trunk", build_wide_range_trunk)
    sections = {"model": str(case["model"]), "data": case["data"]}
    return {**case, "folder": folder, "sections": sections}


def test_every_recipe_reachable_before_fails_the_fidelity_gate(trunk, mlflow_server, tmp_path, run_stage, manifest):
    """The plain chain runs on a .tflite source (engine auto: the LiteRT Quantizer), and full int8,
    dynamic and int16x8 all fail 20 dB on every output: the subject is as hard as it should be."""
    extra = (
        "search:\n  strategy: candidates\n  candidates:\n"
        "    - [{quantize: {mode: dynamic}}]\n    - [{quantize: {mode: int16x8}}]\n"
    )
    result = run_stage(manifest(**trunk["sections"], chain="  - quantize: {mode: int8}\n", gates=FIDELITY_GATE, extra=extra))
    assert result.exit_code == 3, result.output  # a gate verdict, not a refusal
    report = result.report
    trials = report["search"]["trials"]
    assert [t["status"] for t in trials] == ["failed"] * 3
    for trial in trials:
        assert max(v for k, v in trial["metrics"].items() if k.startswith("fidelity_sqnr_db.")) < 20, trial
    # MLflow's dataset lineage: the run's inputs are the data it used, by role, with their digests
    import mlflow

    from pipeline_stage.contract.data import Dataset
    from pipeline_stage.mlflow_io.stage_run import record_digest

    inputs = mlflow.MlflowClient().get_run(report["run_id"]).inputs.dataset_inputs
    by_role = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}
    assert set(by_role) == {"calibration", "evaluation"}
    evaluation = by_role["evaluation"]
    assert evaluation.name == "eval.npz" and json.loads(evaluation.source)["uri"] == str(trunk["folder"] / "eval.npz")
    expected = Dataset(x=np.load(trunk["folder"] / "eval.npz")["x"]).digest()
    assert json.loads(evaluation.profile) == {"samples": 300, "sha256": expected}
    assert evaluation.digest == record_digest(expected, str(trunk["folder"] / "eval.npz"))
    assert json.loads(evaluation.schema) == {"arrays": {"x": {"dtype": "float32", "shape": [300, 64]}}}


def test_auto_search_registers_the_smallest_faithful_model(trunk, mlflow_server, tmp_path, run_stage, versions_of, manifest):
    """The plain chain with `search: {strategy: auto}`: int8 fails on every output, keeping an
    output's own nodes float gains nothing (they share the trunk), so the refinements are abandoned
    as out of reach and the LiteRT Quantizer's recipe tier finds weight-only int8; the smallest
    passing model is registered. Ranked by size here: which of two float-compute models is faster
    depends on the CPU."""
    path = manifest(
        **trunk["sections"],
        chain="  - quantize: {mode: int8}\n",
        gates=FIDELITY_GATE,
        extra="search: {strategy: auto, objective: size_bytes}\nregister: {name: trunk-auto, alias: edge}\n",
    )
    result = run_stage(path)
    assert result.exit_code == 0, result.output
    report = result.report
    search = report["search"]
    trials = {t["origin"]: t for t in search["trials"]}
    assert trials["as written"]["status"] == "failed"
    # every recipe family of the LiteRT Quantizer was tried
    for family in ("weight-only int8", "weight-only int4", "weight-only int4 gptq", "dynamic int4 blockwise 32"):
        assert f"recipe {family}" in trials, sorted(trials)
    assert any("cannot close the shortfall" in p["stopped_because"] for p in search["paths"]), search["paths"]
    passing = [t for t in search["trials"] if t["status"] == "passed"]
    winner = next(t for t in search["trials"] if t["index"] == search["winner"])
    assert winner["metrics"]["size_bytes"] == min(t["metrics"]["size_bytes"] for t in passing)
    assert winner["origin"].startswith("recipe weight-only int8")
    # what it did not try, and why
    assert {"move": "modes", "origin": "mode float16", "reason": "an earlier trial passed"} in search["not_tried"]
    assert any(n["move"] == "engine" and "nothing for this source" in n["reason"] for n in search["not_tried"])
    tflite = result.model_bytes
    assert len(tflite) < 0.5 * trunk["model"].stat().st_size
    x = {"x": trunk["eval"]}
    assert all(v >= 20 for v in sqnr_db(signature_outputs(trunk["float"], x), signature_outputs(tflite, x)).values())
    assert read_flatbuffer(tflite).constant_dtypes()["INT8"] >= 5  # five weight matrices, int8
    assert report["conversion"]["settings"]["engine"] == "litert"
    assert report["registered"]["alias"] == "edge" and len(versions_of("trunk-auto")) == 1
    # the first trial's per-layer error came from the LiteRT Quantizer's comparison: the first
    # layer, where the input's small features are rounded away, is the worst
    worst = search["as_written_per_layer"][0]
    assert worst["op"] == "FULLY_CONNECTED" and worst["rmse/scale"] > 0.5
    assert "Not tried:" in result.report_path.with_suffix(".md").read_text()


def test_blockwise_int4_weights_reach_the_flatbuffer_and_the_delegate_plan(trunk, tmp_path, run_stage, manifest):
    chain = (
        "  - quantize: {mode: dynamic, weight_bits: 4, block_size: 32}\n"
        "  - delegates: {targets: [xnnpack, gpu], benchmark: false}\n  - analyze: {top: 5}\n"
    )
    path = manifest(**trunk["sections"], chain=chain)
    result = run_stage(path)
    assert result.exit_code == 0, result.output
    weights = [t for t in read_flatbuffer(result.model_bytes).tensors if t.is_constant and t.dtype == "INT4"]
    assert len(weights) == 5 and {t.block_size for t in weights} == {32}
    report = result.report
    notes = report["steps"][0]["notes"]["conversion"]
    assert notes["engine"] == "litert" and notes["recipe"] == "int4 weights blockwise 32, dynamic int8 activations, min_max"
    plan = report["steps"][1]["notes"]["targets"]
    assert plan["xnnpack"]["on_cpu"] == 0
    assert plan["gpu"]["blockers"]["op FULLY_CONNECTED with int4 (blockwise) weights"] == 5
    per_layer = report["steps"][2]["notes"]["per_layer"]
    assert isinstance(per_layer, list) and per_layer and {"op", "tensor", "rmse/scale"} <= set(per_layer[0])


def test_a_litert_recipe_file_is_applied_and_counts_in_the_digest(trunk, tmp_path, monkeypatch, run_stage, invoke, manifest):
    import litert_quantizer

    from pipeline_stage.host.plugin_host import build_host
    from pipeline_stage.manifest import load_manifest

    monkeypatch.chdir(tmp_path)  # a recipe path is relative to the working directory
    shutil.copy(Path(litert_quantizer.__file__).parent / "recipes" / "dynamic_wi8_afp32_recipe.json", "recipe.json")
    path = manifest(**trunk["sections"], chain="  - quantize: {recipe: recipe.json}\n")
    result = run_stage(path)
    assert result.exit_code == 0, result.output
    assert read_flatbuffer(result.model_bytes).constant_dtypes()["INT8"] == 5
    notes = result.report["steps"][0]["notes"]["conversion"]
    assert notes["quantization"] == "recipe" and notes["recipe"].startswith("recipe file recipe.json (sha256 ")
    host = build_host(load_entry_points=False)
    before = load_manifest(path, host).chain_digest
    recipe = json.loads(Path("recipe.json").read_text())
    recipe[0]["op_config"]["weight_tensor_config"]["num_bits"] = 4
    Path("recipe.json").write_text(json.dumps(recipe))
    assert load_manifest(path, host).chain_digest != before
    # a recipe file decides the recipe: params that would too are refused
    clash = manifest(**trunk["sections"], chain="  - quantize: {recipe: recipe.json, mode: dynamic}\n", name="c.yaml")
    refused = invoke("validate", str(clash))
    assert refused.exit_code == 2 and "leave mode unset beside `recipe`" in refused.stderr


def test_a_batch_too_big_for_a_kernel_is_retried_smaller_with_the_same_metrics(tmp_path, run_stage, manifest):
    """int16x8 convolutions use an im2col buffer indexed with 32 bits: a 15x15 convolution on
    32x32x8 inputs at a batch of 1,200 exceeds it and fails to prepare. The evaluation retries in
    halves and says so, and the metrics equal those of a run at a batch that fits."""
    import keras
    import tensorflow as tf

    x = keras.Input((32, 32, 8), name="x")
    model = keras.Model(x, keras.layers.Conv2D(2, 15, padding="same", activation="relu")(x))
    (tmp_path / "conv.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(0).normal(size=(1200, 32, 32, 8)).astype(np.float32))
    reports, pages = {}, {}
    for batch in (1200, 100):
        text = (
            f"model: {tmp_path / 'conv.tflite'}\ndata: {{calibration: {tmp_path / 'data.npz'}, evaluation: {tmp_path / 'data.npz'}}}\n"
            "chain:\n  - quantize: {mode: int16x8, calibration_samples: 20}\n"
            f"evaluation: {{batch_size: {batch}, metrics: [fidelity_sqnr_db, fidelity_cosine]}}\n"
        )
        path = manifest(text, name=f"b{batch}.yaml")
        result = run_stage(path)
        assert result.exit_code == 0, result.output
        reports[batch] = result.report
        pages[batch] = result.report_path.with_suffix(".md").read_text()
    notes = reports[1200]["evaluation_notes"]
    assert any("a batch of 1200 failed" in n and "im2col" in n and "retried at 600" in n for n in notes), notes
    assert reports[100]["evaluation_notes"] == []
    for name, value in reports[100]["candidate"].items():
        assert reports[1200]["candidate"][name] == pytest.approx(value, rel=1e-6), name
    assert "## Evaluation notes" in pages[1200]


def test_a_tensorflow_source_takes_litert_only_recipes_on_engine_auto(digits_model, digits_data, tmp_path, run_stage, manifest):
    """`engine: auto` on a Keras source: int8 stays on the converter (its digest unchanged, see
    test_chain_digests), weight-only goes to the LiteRT Quantizer."""
    digits_model.save(tmp_path / "digits.keras")
    np.savez(tmp_path / "eval.npz", x=digits_data.evaluation[0], y=digits_data.evaluation[1])
    text = (
        f"model: {tmp_path / 'digits.keras'}\ndata: {{evaluation: {tmp_path / 'eval.npz'}}}\n"
        "chain:\n  - quantize: {mode: weight_only}\ngates:\n  - {metric: accuracy, max_drop: 0.02}\n"
    )
    path = manifest(text)
    result = run_stage(path)
    assert result.exit_code == 0, result.output
    notes = result.report["steps"][0]["notes"]["conversion"]
    assert notes == {
        "quantization": "weight_only",
        "io": "float32",
        "engine": "litert",
        "engine_chosen_by": "auto",
        "recipe": "int8 weights per channel, float activations, min_max",
    }
    info = read_flatbuffer(result.model_bytes)
    assert info.constant_dtypes()["INT8"] > 0 and info.ops["DEQUANTIZE"] > 0  # int8 weights, dequantized to float
