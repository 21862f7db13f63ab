"""The stage end to end against a real MLflow server, real TensorFlow and the LiteRT interpreter."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest

from pipeline_stage.contract.report import Report
from pipeline_stage.engine.flatbuffer import read as read_flatbuffer
from tests import helpers
from tests.helpers import EXAMPLES, tflite_of

# The digits CNN from the session's source, its data, one accuracy gate: what these tests vary.
DIGITS = dict(
    model="models:/digits-cnn@champion",
    data={"calibration": "runs:/${source.run_id}/data/calib.npz", "evaluation": "runs:/${source.run_id}/data/eval.npz"},
    gates=[{"metric": "accuracy", "max_drop": 0.02}],
)


@pytest.fixture(scope="module")
def int8_run(digits_source, tmp_path_factory):
    """The example manifest, as the README runs it, against the session's server."""
    result = helpers.run_stage(tmp_path_factory.mktemp("int8"), EXAMPLES / "digits-int8.yaml")
    assert result.exit_code == 0, result.output
    return result.report, result


def test_int8_report_has_the_promised_keys(int8_run):
    report, result = int8_run
    for key in ("passed", "baseline", "candidate", "steps", "gates", "registered"):
        assert key in report
    assert report["passed"] is True
    assert set(report["candidate"]) == {"accuracy", "size_bytes", "latency_p50_ms"}
    step = report["steps"][0]
    assert (step["name"], step["phase"]) == ("quantize", "convert")
    assert step["params"]["mode"] == "int8" and "size_bytes" in step["metrics"] and step["seconds"] > 0
    assert {g["metric"] for g in report["gates"]} == {"accuracy", "size_bytes"}
    assert all(set(g) >= {"metric", "rule", "threshold", "value", "passed"} for g in report["gates"])
    assert set(report["registered"]) >= {"name", "version", "alias", "uri"}
    # the printed table names the registered URI
    assert report["registered"]["uri"] in result.stdout


def test_the_report_says_where_the_time_went(int8_run):
    timing = int8_run[0]["timing"]
    phases = ("startup", "resolve", "model_download", "load", "baseline", "chain", "evaluate", "register", "reports")
    assert all(timing[f"{p}_s"] >= 0 for p in phases), timing
    # the phases are disjoint parts of the run: together no longer than the whole
    assert sum(timing[f"{p}_s"] for p in phases) <= timing["total_s"] + 0.01
    assert timing["chain_s"] > 0 and timing["baseline_s"] > 0
    assert timing["peak_rss_mb"] > 100  # this process holds TensorFlow: hundreds of MB


def test_latency_is_timed_side_by_side_in_alternating_rounds(int8_run):
    report = int8_run[0]
    (timed,) = report["timed"]
    assert timed["metric"] == "latency_p50_ms" and timed["rounds"] == 5
    assert len(timed["baseline_rounds"]) == len(timed["candidate_rounds"]) == 5
    # the candidate's latency is the side-by-side one, and so is what it is compared with; the
    # baseline's own latency is the one it measured alone, once (what a search ranks against)
    assert report["candidate"]["latency_p50_ms"] == timed["candidate"]
    assert Report.model_validate(report).compared_baseline()["latency_p50_ms"] == timed["baseline"]
    assert report["baseline"]["latency_p50_ms"] == report["baseline_tflite"]["latency_p50_ms"]
    latency_gates = [g for g in report["gates"] if g["metric"] == "latency_p50_ms"]
    assert all(g["baseline"] == timed["baseline"] for g in latency_gates)
    differences = [c - b for b, c in zip(timed["baseline_rounds"], timed["candidate_rounds"])]
    assert timed["spread"] == pytest.approx((max(differences) - min(differences)) / 2)


def test_int8_flatbuffer_is_really_int8(int8_run):
    report, _ = int8_run
    info = read_flatbuffer(tflite_of(report["registered"]))
    weights = info.constant_dtypes()
    assert weights["INT8"] >= 3, weights  # two conv kernels and the dense kernel
    assert weights["INT32"] >= 3, weights  # their biases, int32 as full-integer kernels need
    assert "FLOAT32" not in weights, weights
    # activations: everything between the float I/O boundary ops is int8
    assert info.activation_dtypes()["INT8"] >= 4
    assert info.ops["QUANTIZE"] >= 1 and info.ops["DEQUANTIZE"] >= 1
    assert report["candidate"]["size_bytes"] < 0.5 * report["baseline"]["size_bytes"]
    assert report["baseline"]["accuracy"] - report["candidate"]["accuracy"] <= 0.02


def test_alias_and_lineage_tags_on_the_new_version(int8_run, digits_source):
    report, _ = int8_run
    reg = report["registered"]
    client = mlflow.MlflowClient()
    by_alias = client.get_model_version_by_alias(reg["name"], "edge-candidate")
    assert by_alias.version == reg["version"]
    tags = client.get_model_version(reg["name"], reg["version"]).tags
    assert tags["source.name"] == "digits-cnn"
    assert tags["source.version"] == digits_source["version"]
    assert tags["source.run_id"] == digits_source["run_id"]
    assert tags["pipeline_stage.chain_digest"] == report["manifest"]["chain_digest"]
    assert tags["pipeline_stage.version"] == report["package_version"]
    assert tags["gate.accuracy.max_drop"].startswith("pass")
    assert float(tags["metric.size_bytes"]) == report["candidate"]["size_bytes"]
    assert "metric.latency_p50_ms" in tags and "baseline.accuracy" in tags


def test_registered_version_predicts_through_pyfunc(int8_run, digits_data):
    report, _ = int8_run
    model = mlflow.pyfunc.load_model(report["registered"]["uri"])
    x, y = digits_data.evaluation
    out = model.predict(x[:50])
    assert out.shape == (50, 10)
    assert np.mean(out.argmax(-1) == y[:50]) >= 0.9
    assert model.metadata.signature is not None
    # the pins come from this environment (MLflow's own environment scan is skipped for them)
    from importlib.metadata import version

    from mlflow.utils import requirements_utils

    pins = mlflow.pyfunc.get_model_dependencies(report["registered"]["uri"])
    lines = set(open(pins).read().split())
    assert {f"ai-edge-litert=={version('ai-edge-litert')}", f"numpy=={np.__version__}", f"mlflow=={mlflow.__version__}"} <= lines
    assert requirements_utils._MODULES_TO_PACKAGES != {}  # left as MLflow had it, for requirement inference


def test_run_keeps_report_manifest_and_raw_tflite(int8_run):
    report, _ = int8_run
    client = mlflow.MlflowClient()
    names = {a.path for a in client.list_artifacts(report["run_id"])}
    assert {"manifest.yaml", "report.json", "report.md", "tflite"} <= names
    assert [a.path for a in client.list_artifacts(report["run_id"], "tflite")] == ["tflite/model.tflite"]
    run = client.get_run(report["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["manifest.chain.0.quantize.mode"] == "int8"
    assert "step.0.quantize.size_bytes" in run.data.metrics
    md = Path(mlflow.artifacts.download_artifacts(run_id=report["run_id"], artifact_path="report.md")).read_text()
    assert "## Gates" in md and "quantize" in md


@pytest.mark.parametrize("mode", ["float16", "dynamic", "int16x8"])
def test_other_modes_write_their_types(digits_source, tmp_path, mode, run_stage, manifest):
    path = manifest(**DIGITS, chain=f"  - quantize: {{mode: {mode}}}\n", extra="register: {name: digits-" + mode + "}\n")
    result = run_stage(path)
    assert result.exit_code == 0, result.output
    info = read_flatbuffer(result.model_bytes)
    weights = [t for t in info.tensors if t.is_constant and len(t.shape) >= 2]  # kernels, not biases
    if mode == "float16":
        assert {t.dtype for t in weights} == {"FLOAT16"}, weights
    elif mode == "int16x8":  # 16-bit activations, 8-bit weights, float I/O at the edges
        assert {t.dtype for t in weights} == {"INT8"}, weights
        assert info.activation_dtypes()["INT16"] >= 4, info.activation_dtypes()
        return
    else:
        # dynamic range quantizes every kernel the converter deems worth it (>= 1024 values)
        big = [t for t in weights if np.prod(t.shape) >= 1024]
        assert big and {t.dtype for t in big} == {"INT8"}, weights
    assert "FLOAT32" in info.activation_dtypes() and "INT8" not in info.activation_dtypes()
    report = result.report
    assert report["registered"]["alias"] is None and report["registered"]["version"] == "1"


@pytest.mark.parametrize("engine", ["converter", "litert"])
def test_int8_io_makes_input_and_output_int8(digits_source, tmp_path, digits_data, engine, run_stage, manifest):
    path = manifest(**DIGITS, chain=f"  - quantize: {{mode: int8, io: int8, engine: {engine}}}\n")
    result = run_stage(path)
    assert result.exit_code == 0, result.output
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=result.model_bytes)
    assert it.get_input_details()[0]["dtype"] == np.int8
    assert it.get_output_details()[0]["dtype"] == np.int8
    report = result.report
    assert report["candidate"]["accuracy"] >= report["baseline"]["accuracy"] - 0.02  # I/O was quantized right
    assert report["registered"] is None  # no register section: evaluate only


def test_failed_gate_exits_3_and_registers_nothing(digits_source, tmp_path, run_stage, manifest, versions_of):
    path = manifest(
        **{**DIGITS, "gates": "  - {metric: size_bytes, max_ratio: 0.01}\n"},
        chain="  - quantize: {mode: dynamic}\n",
        extra="register: {name: digits-gated, alias: prod}\n",
    )
    result = run_stage(path)
    assert result.exit_code == 3, result.output
    assert "gate failed: size_bytes max_ratio" in result.output
    assert versions_of("digits-gated") == []
    report = result.report
    assert report["passed"] is False and report["registered"] is None
    # the run keeps the artifact and the report for inspection
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(report["run_id"])}
    assert {"report.json", "tflite"} <= names


def test_on_failure_register_tags_failed_and_never_moves_alias(digits_source, tmp_path, run_stage, manifest):
    reg = "register: {name: digits-onfail, alias: prod, on_failure: register}\n"
    good = manifest(**DIGITS, chain="  - quantize: {mode: dynamic}\n", extra=reg, name="good.yaml")
    assert run_stage(good).exit_code == 0
    bad = manifest(
        **{**DIGITS, "gates": "  - {metric: size_bytes, max_ratio: 0.01}\n"},
        chain="  - quantize: {mode: dynamic}\n",
        extra=reg,
        name="bad.yaml",
    )
    result = run_stage(bad)
    assert result.exit_code == 3
    client = mlflow.MlflowClient()
    assert client.get_model_version_by_alias("digits-onfail", "prod").version == "1"
    failed = client.get_model_version("digits-onfail", "2")
    assert failed.tags["pipeline_stage.passed"] == "false"
    assert failed.tags["gate.size_bytes.max_ratio"].startswith("fail")
    assert result.report["registered"]["alias"] is None


def test_model_uri_override_by_version_run_and_local_path(digits_source, digits_model, tmp_path, run_stage, manifest):
    path = manifest(**{**DIGITS, "model": "models:/does-not-matter@x"}, chain="  - quantize: {mode: float16}\n")
    for uri in (f"models:/digits-cnn/{digits_source['version']}", f"runs:/{digits_source['run_id']}/model"):
        result = run_stage(path, "--model-uri", uri)
        assert result.exit_code == 0, (uri, result.output)
        assert result.report["source"]["run_id"] == digits_source["run_id"]
    # a local .keras file: data must then be given as paths (no source run)
    local = tmp_path / "digits.keras"
    digits_model.save(local)
    data_dir = mlflow.artifacts.download_artifacts(run_id=digits_source["run_id"], artifact_path="data", dst_path=str(tmp_path))
    text = (
        f"model: {local}\ndata: {{evaluation: {data_dir}/eval.npz}}\nchain:\n  - quantize: {{mode: float16}}\n"
        "gates:\n  - {metric: accuracy, max_drop: 0.01}\n"
    )
    result = run_stage(manifest(text, name="local.yaml"))
    assert result.exit_code == 0, result.output
    assert result.report["candidate"]["accuracy"] > 0.9


def test_selective_int8_keeps_named_ops_in_float(digits_source, tmp_path, run_stage, manifest):
    path = manifest(**DIGITS, chain="  - quantize: {mode: int8, keep_float_ops: [FULLY_CONNECTED]}\n")
    result = run_stage(path)
    assert result.exit_code == 0, result.output
    info = read_flatbuffer(result.model_bytes)
    kernels = {t.dtype for t in info.tensors if t.is_constant and len(t.shape) == 4}
    dense = [t for t in info.tensors if t.is_constant and len(t.shape) == 2]
    assert kernels == {"INT8"}, kernels  # the convolutions are int8
    assert dense and {t.dtype for t in dense} == {"FLOAT32"}, dense  # the dense layer stayed float
    report = result.report
    assert report["steps"][0]["notes"]["conversion"]["kept_float"]["ops"] == ["FULLY_CONNECTED"]


@pytest.mark.parametrize("engine", ["converter", "litert"])
def test_per_tensor_int8_has_one_scale_per_weight_tensor(int8_run, digits_source, tmp_path, engine, run_stage, manifest):
    """per_channel: false -> every int8 kernel carries one scale (the default carries one per channel)."""

    def kernel_scales(model_bytes: bytes) -> list[int]:
        return [t.scales for t in read_flatbuffer(model_bytes).tensors if t.is_constant and t.dtype == "INT8"]

    # the converter: the example manifest (which also drops tensor names); the LiteRT Quantizer inline
    path = (
        EXAMPLES / "digits-int8-smallest.yaml"
        if engine == "converter"
        else manifest(**DIGITS, chain="  - quantize: {mode: int8, per_channel: false, engine: litert}\n")
    )
    result = run_stage(path)
    assert result.exit_code == 0, result.output
    per_tensor = result.model_bytes
    per_channel = tflite_of(int8_run[0]["registered"])
    assert kernel_scales(per_channel) and max(kernel_scales(per_channel)) > 1  # the default: a scale a channel
    assert kernel_scales(per_tensor) and set(kernel_scales(per_tensor)) == {1}
    assert read_flatbuffer(per_tensor).quantization_param_bytes() < read_flatbuffer(per_channel).quantization_param_bytes()
    report = result.report
    assert report["steps"][0]["notes"]["conversion"]["weight_scales"] == "per tensor"
    assert report["baseline"]["accuracy"] - report["candidate"]["accuracy"] <= 0.02
    if engine == "converter":
        assert read_flatbuffer(per_tensor).tensor_name_bytes() == 0 and len(per_tensor) < 0.9 * len(per_channel)
