"""Accelerators from the runtime itself: LiteRT's vendor compiler plugins partition a model for an
NPU target (`delegates: {npu: [...]}`, metric `npu_ops_offloaded.<compiler>_<soc>`), and `compile`
writes one compiled model per target, registered beside the portable model in the same version.

Intel's plugin runs here (OpenVINO, from the `intel` extra): its partition is the real one, and its
CPU graph backend compiles a model this machine runs through Intel's dispatch library, so the
compiled model is measured with the manifest's metrics and gates. Qualcomm's SDK is not installed
here: a target of it is refused with exit 2 before any work. A fake compiler (a plugin of the
test's own) stands for a target whose code runs on its device only."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from pipeline_stage import AcceleratorCompiler, Compiled, Partition, hookimpl, read_flatbuffer, use_plugins
from pipeline_stage.mlflow_io.pyfunc_model import ModelFilesAltered, check_files
from pipeline_stage_plugins.compile_litert import COMPILERS, read_stamp
from tests.tflite_corpus.make_corpus import images as corpus_images

CORPUS = Path(__file__).parent / "tflite_corpus"
DATA = "data: {calibration: 'runs:/${source.run_id}/data/calib.npz', evaluation: 'runs:/${source.run_id}/data/eval.npz'}\n"
INTEL_CPU = [
    {"target": "intel_openvino/LNL", "options": {"graph_backend": "cpu"}},
    {"target": "intel_openvino/PTL", "options": {"graph_backend": "cpu"}},
]


class DeviceOnlyNpu(AcceleratorCompiler):
    """A fake NPU compiler: takes every op, and what it makes runs on its device only."""

    name = "device_only"
    socs = ("X1",)
    sdk = "nothing"

    def partition(self, model_bytes, soc):
        ops = sum(read_flatbuffer(model_bytes).main_ops.values())
        return Partition(ops=ops, offloaded=ops, partitions=1)

    def compile(self, model_bytes, soc, options):
        return Compiled(model_bytes + b"\0" * 16, self.partition(model_bytes, soc), {}, "fake 1.0")


class DeviceOnlyPlugin:
    @hookimpl
    def register_compilers(self, register):
        register(DeviceOnlyNpu)


def _fft_tflite(path: Path) -> Path:
    """A float .tflite with an op Intel's compiler refuses (RFFT2D, and a shape it cannot take)."""
    import tensorflow as tf

    class Spectrum(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 16], tf.float32)])
        def __call__(self, x):
            return tf.abs(tf.signal.rfft(x)) + tf.reduce_sum(x)

    module = Spectrum()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.__call__.get_concrete_function()], module)
    path.write_bytes(converter.convert())
    return path


def test_intel_partition_takes_one_model_whole_and_names_the_op_it_leaves_on_the_cpu(digits_source, run_stage, manifest):
    intel = COMPILERS["intel_openvino"]()
    whole = intel.partition((CORPUS / "vision_metadata.tflite").read_bytes(), "LNL")
    assert (whole.ops, whole.offloaded, whole.partitions, whole.on_cpu, whole.share) == (10, 10, 1, {}, 1.0)
    # the digits CNN as the stage converts it keeps a dynamic batch: its SHAPE op stays on the CPU
    text = (
        "model: models:/digits-cnn@champion\n" + DATA + "chain:\n"
        "  - delegates: {npu: [intel_openvino/LNL, qualcomm/SM8650], benchmark: false}\n"
        "evaluation: {metrics: [accuracy, npu_ops_offloaded.intel_openvino_LNL]}\n"
        "gates:\n  - {metric: npu_ops_offloaded.intel_openvino_LNL, min: 1.0}\n"
    )
    result = run_stage(manifest(text))
    assert result.exit_code == 3, result.output  # the gate that asks for the whole model fails
    npu = result.report["steps"][0]["notes"]["npu"]
    intel_plan, qualcomm_plan = npu["intel_openvino/LNL"], npu["qualcomm/SM8650"]
    assert intel_plan["from"].startswith("intel_openvino's compiler plugin")
    assert intel_plan["on_cpu"] == {"SHAPE": 1} and intel_plan["offloaded"] == intel_plan["ops"] - 1
    assert result.report["candidate"]["npu_ops_offloaded.intel_openvino_LNL"] == intel_plan["share"] < 1.0
    # Qualcomm's plugin cannot load without its SDK: the op-set table stands in, and says so
    assert qualcomm_plan["from"].startswith("fallback: the int8 NPU op-set table") and "libQnnHtp.so" in qualcomm_plan["from"]
    assert any(
        f.startswith("intel_openvino/LNL: 1 of") and "SHAPE x1" in f for f in result.report["steps"][0]["notes"]["findings"]
    )


def test_compiled_models_are_registered_beside_the_portable_one_evaluated_and_verified(
    digits_source, run_stage, manifest, invoke, tmp_path
):
    text = (
        "model: models:/digits-cnn@champion\n" + DATA + "chain:\n  - quantize: {mode: int8}\n"
        "evaluation: {metrics: [accuracy, fidelity_sqnr_db, size_bytes]}\n"
        "gates:\n  - {metric: accuracy, max_drop: 0.02}\n"
        f"compile: {json.dumps({'targets': INTEL_CPU})}\n"
        "register: {name: digits-npu, alias: npu}\n"
    )
    result = run_stage(manifest(text))
    assert result.exit_code == 0, result.output
    report = result.report
    assert [c["target"] for c in report["compiled"]] == ["intel_openvino/LNL", "intel_openvino/PTL"]
    client = mlflow.MlflowClient()
    reg = report["registered"]
    tags = client.get_model_version(reg["name"], reg["version"]).tags
    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=reg["model_uri"], dst_path=str(tmp_path / "model")))
    for record in report["compiled"]:
        soc = record["target"].split("/")[1]
        assert record["status"] == "compiled" and record["evaluated"], record
        # measured here like the candidate, on the same data, and gated
        assert abs(record["metrics"]["accuracy"] - report["candidate"]["accuracy"]) <= 0.01
        assert record["metrics"]["fidelity_sqnr_db"] > 25
        assert [g["metric"] for g in record["gates"]] == ["accuracy"] and record["gates"][0]["passed"]
        assert record["partition"]["on_cpu"] == {"SHAPE": 1}
        compiled = (root / record["artifact"]).read_bytes()
        assert hashlib.sha256(compiled).hexdigest() == record["sha256"]
        assert read_stamp(compiled) == {"manufacturer": "IntelOpenVINO", "soc": soc} == record["stamp"]
        assert "CUSTOM:DISPATCH_OP" in read_flatbuffer(compiled).ops
        key = f"intel_openvino_{soc}"
        assert f"sha256={record['sha256']}" in tags[f"pipeline_stage.compiled.{key}"]
        assert tags[f"pipeline_stage.sha256.model/artifacts/{key}.tflite"].split()[0] == record["sha256"]
    assert "## Compiled for accelerators" in Path(result.report_path).with_suffix(".md").read_text()
    verified = invoke("verify", reg["uri"])
    assert verified.exit_code == 0, verified.output
    assert "artifacts/intel_openvino_LNL.tflite" in verified.output
    model = mlflow.pyfunc.load_model(reg["uri"])  # the pyfunc checks the compiled files too
    assert model.predict(np.zeros((1, 8, 8, 1), np.float32)).shape == (1, 10)
    expected = yaml.safe_load((root / "MLmodel").read_text())["flavors"]["python_function"]["config"]["pipeline_stage.sha256"]
    (root / "artifacts" / "intel_openvino_PTL.tflite").write_bytes(b"altered")
    with pytest.raises(ModelFilesAltered, match="intel_openvino_PTL"):
        check_files(root, expected)


def test_hook_register_compilers_a_rejected_and_a_device_only_target_leave_the_portable_model_registered(
    mlflow_server, run_stage, manifest, tmp_path
):
    model = _fft_tflite(tmp_path / "spectrum.tflite")
    np.savez(tmp_path / "eval.npz", x=np.random.default_rng(0).normal(size=(20, 16)).astype(np.float32))
    text = (
        f"model: {model}\ndata: {{evaluation: {tmp_path / 'eval.npz'}}}\nchain: []\n"
        "evaluation: {metrics: [fidelity_sqnr_db, size_bytes]}\n"
        "gates:\n  - {metric: fidelity_sqnr_db, min: 40}\n"
        f"compile: {json.dumps({'targets': [INTEL_CPU[0], 'device_only/X1']})}\n"
        "register: {name: spectrum-npu}\n"
    )
    with use_plugins((DeviceOnlyPlugin(), "device-only-npu")):
        result = run_stage(manifest(text))
    assert result.exit_code == 0, result.output
    rejected, device_only = result.report["compiled"]
    assert rejected["status"] == "rejected" and "Exception" in rejected["error"] and rejected["artifact"] is None
    assert device_only["status"] == "compiled" and not device_only["evaluated"] and not device_only["gates"]
    assert "runs on the device only" in device_only["not_evaluated"]
    reg = result.report["registered"]
    tags = mlflow.MlflowClient().get_model_version(reg["name"], reg["version"]).tags
    assert tags["pipeline_stage.compiled.intel_openvino_LNL"].startswith("rejected: ")
    assert tags["pipeline_stage.compiled.device_only_X1"].endswith("not evaluated here")
    assert "pipeline_stage.sha256.model/artifacts/device_only_X1.tflite" in tags
    markdown = Path(result.report_path).with_suffix(".md").read_text()
    assert "rejected by the compiler" in markdown and "not evaluated here" in markdown
    html_report = Path(result.report_path).with_suffix(".html").read_text()
    assert "Compiled for accelerators" in html_report and "rejected by the compiler" in html_report


def test_a_target_whose_compiler_is_missing_is_refused_before_any_work(digits_source, run_stage, manifest, invoke):
    text = (
        "model: models:/digits-cnn@champion\n"
        + DATA
        + "chain: []\nexperiment: npu-refused\ncompile: {targets: [qualcomm/SM8650]}\n"
    )
    result = run_stage(manifest(text))
    assert result.exit_code == 2, result.output
    assert "`qualcomm/SM8650` cannot be compiled here" in result.stderr and "ai-edge-litert-sdk-qualcomm" in result.stderr
    assert "docs/accelerators.md" in result.stderr
    assert mlflow.get_experiment_by_name("npu-refused") is None  # no run, not even an experiment
    # Intel NPU code needs OpenVINO's NPU compiler, which this machine lacks: the same refusal
    intel = manifest(
        "model: models:/digits-cnn@champion\n" + DATA + "chain: []\ncompile: {targets: [intel_openvino/LNL]}\n", name="i.yaml"
    )
    refused = run_stage(intel)
    assert refused.exit_code == 2 and "NPU compiler" in refused.stderr and "graph_backend: cpu" in refused.stderr
    # an unknown SoC is the manifest's error, with the SoCs the compiler knows
    wrong = manifest("model: models:/digits-cnn@champion\nchain: []\ncompile: {targets: [qualcomm/SM9999]}\n", name="w.yaml")
    validated = invoke("validate", str(wrong))
    assert validated.exit_code == 2 and "SM8650" in validated.stderr and "compile.targets[0]" in validated.stderr
    listing = invoke("plugins")
    assert "intel_openvino (SoCs LNL, PTL" in listing.output


def test_the_corpus_images_feed_the_intel_compiled_model_of_a_shipped_file():
    """A shipped float .tflite (fixed batch 1, TFLite metadata) compiled for Intel's CPU backend runs
    through the dispatch library with the same outputs as the portable file, to about 1e-4."""
    from pipeline_stage.engine.litert_runtime import TFLiteModel

    intel = COMPILERS["intel_openvino"]()
    options = intel.Params(graph_backend="cpu")
    shipped = (CORPUS / "vision_metadata.tflite").read_bytes()
    compiled = intel.compile(shipped, "PTL", options)
    assert compiled.partition.share == 1.0 and compiled.stamp["soc"] == "PTL"
    x = corpus_images()[:8]
    expected = TFLiteModel(shipped).predict_outputs(x)
    got = intel.runner(compiled, "PTL", options)(x)
    for name, value in expected.items():
        assert np.max(np.abs(got[name] - value)) < 1e-3, name


def test_the_compilers_soc_lists_are_the_wheels_own():
    """The SoC lists are written out (validating a manifest imports no LiteRT): the wheel's targets."""
    import importlib

    for cls in COMPILERS.values():
        module = importlib.import_module(f"ai_edge_litert.aot.vendors.{cls.folder}.target")
        assert cls.socs == tuple(s.value for s in module.SocModel if s.value != "ALL"), cls.name
        assert cls.manufacturer() == next(iter(module.SocManufacturer)).value


def test_the_kfp_component_returns_the_compiled_models_in_its_compiled_output(mlflow_server, tmp_path):
    """What the component body runs (kfp_support.optimize): one file per target in the `compiled`
    folder, its status and sha256 in the output's metadata."""
    from pipeline_stage.kfp_support import optimize

    np.savez(tmp_path / "eval.npz", x=corpus_images()[100:120])
    text = (
        f"model: {CORPUS / 'vision_metadata.tflite'}\ndata: {{evaluation: {tmp_path / 'eval.npz'}}}\nchain: []\n"
        "evaluation: {metrics: [fidelity_sqnr_db]}\n"
        f"compile: {json.dumps({'targets': [INTEL_CPU[1], 'device_only/X1']})}\n"
    )
    metadata, compiled_meta, metrics = {}, {}, {}
    with use_plugins((DeviceOnlyPlugin(), "device-only-npu")):
        result = optimize(
            text,
            "",
            mlflow_server,
            str(tmp_path / "model.tflite"),
            str(tmp_path / "report.md"),
            metadata,
            metrics.__setitem__,
            None,
            str(tmp_path / "compiled"),
            compiled_meta,
        )
    assert result["passed"]
    assert sorted(p.name for p in (tmp_path / "compiled").iterdir()) == ["device_only_X1.tflite", "intel_openvino_PTL.tflite"]
    ptl = compiled_meta["intel_openvino/PTL"]
    assert ptl["status"] == "compiled" and ptl["evaluated_here"] and ptl["ops_offloaded"] == 1.0
    assert hashlib.sha256((tmp_path / "compiled" / ptl["file"]).read_bytes()).hexdigest() == ptl["sha256"]
    assert not compiled_meta["device_only/X1"]["evaluated_here"]


def test_a_compiled_model_the_runtime_refuses_is_that_targets_failure(mlflow_server, run_stage, manifest, tmp_path):
    """Intel's CPU backend compiles the sparse float16 file (its DENSIFY ops left on the CPU), but
    LiteRT's CompiledModel cannot build an interpreter for what it made: that target fails, with
    nothing registered for it, and the portable model is registered as usual."""
    np.savez(tmp_path / "eval.npz", x=corpus_images()[100:110])
    text = (
        f"model: {CORPUS / 'vision_f16_sparse.tflite'}\ndata: {{evaluation: {tmp_path / 'eval.npz'}}}\nchain: []\n"
        "evaluation: {metrics: [fidelity_sqnr_db]}\n"
        f"compile: {json.dumps({'targets': [INTEL_CPU[0]]})}\n"
        "register: {name: sparse-npu}\n"
    )
    result = run_stage(manifest(text))
    assert result.exit_code == 0, result.output
    (record,) = result.report["compiled"]
    assert record["status"] == "failed" and "does not run here" in record["error"] and record["artifact"] is None
    assert record["partition"]["on_cpu"] == {"DENSIFY": 6}
    reg = result.report["registered"]
    tags = mlflow.MlflowClient().get_model_version(reg["name"], reg["version"]).tags
    assert tags["pipeline_stage.compiled.intel_openvino_LNL"].startswith("failed: ")
    assert not any("intel_openvino" in k for k in tags if k.startswith("pipeline_stage.sha256."))
