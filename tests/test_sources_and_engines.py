"""Model sources and quantization engines are plugins: a team's own model kind and its own
quantizer run through the stage by the same hooks the built-ins use, and the stage runs float
chains with the quantize plugin taken out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline_stage import read_flatbuffer, use_plugins
from tests.fake_plugins import BrokenEngines, LinearSources

ENGINE_PKG = Path(__file__).parent / "engine_pkg"  # docs/plugins.md's in-house engine, as a package


@pytest.fixture(scope="module")
def linear_model(digits_data, tmp_path_factory):
    """A least-squares linear classifier of the digits (64 pixels -> 10 scores) as a `.linear` file,
    with its data as the stage reads it (x flattened) and numpy's own accuracy on it."""
    folder = tmp_path_factory.mktemp("linear")
    x, y = (a.reshape(len(a), -1).astype(np.float32) for a in (digits_data.train[0], np.eye(10)[digits_data.train[1]]))
    w, *_ = np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)
    np.savez(folder / "digits.npz", w=w[:-1], b=w[-1])
    (folder / "digits.linear").write_bytes((folder / "digits.npz").read_bytes())
    ex, ey = digits_data.evaluation
    ex = ex.reshape(len(ex), -1)
    np.savez(folder / "eval.npz", x=ex, y=ey)
    np.savez(folder / "calib.npz", x=digits_data.calibration[0].reshape(len(digits_data.calibration[0]), -1))
    accuracy = float(np.mean(np.argmax(ex @ w[:-1] + w[-1], axis=1) == ey))
    return {"folder": folder, "model": folder / "digits.linear", "accuracy": accuracy}


def _data(src) -> dict:
    return {"calibration": str(src["folder"] / "calib.npz"), "evaluation": str(src["folder"] / "eval.npz")}


def test_hook_register_sources(linear_model, mlflow_server, manifest, run_stage, invoke, versions_of):
    """A team's own model kind: recognised by its suffix (so `validate` checks the chain against it),
    opened and predicted by the plugin (the baseline is numpy's own outputs), converted to float by
    it and quantized by the LiteRT Quantizer, which takes any source."""
    src = linear_model
    gates = [{"metric": "accuracy", "max_drop": 0.02}]
    with use_plugins((LinearSources(), "linear-sources")):
        path = manifest(
            model=str(src["model"]),
            data=_data(src),
            chain=[{"quantize": {"mode": "dynamic"}}],
            gates=gates,
            register={"name": "digits-linear", "alias": "edge"},
        )
        result = run_stage(path)
        assert result.exit_code == 0, result.output
        report = result.report
        assert report["source"]["kind"] == "linear"
        assert abs(report["baseline"]["accuracy"] - src["accuracy"]) < 1e-9  # the plugin's own predictions
        assert report["conversion"]["settings"]["engine"] == "litert"  # auto: the converter needs a TensorFlow model
        assert read_flatbuffer(result.model_bytes).constant_dtypes()["INT8"] >= 1  # the Dense kernel
        assert [v.version for v in versions_of("digits-linear")] == ["1"]
        # the URI shows the kind: the converter engine is refused at validate, naming the kind
        refused = manifest(model=str(src["model"]), data=_data(src), chain=[{"quantize": {"engine": "converter"}}], name="c.yaml")
        checked = invoke("validate", str(refused))
        assert checked.exit_code == 2 and "the source is a `linear` model" in checked.stderr, checked.output
        # an MLflow folder whose MLmodel names the flavor: asked before the built-ins, though a
        # .tflite lies beside it (which the built-in `tflite` source would take)
        logged = src["folder"] / "logged"
        (logged / "data").mkdir(parents=True)
        (logged / "MLmodel").write_text("flavors:\n  linear_model: {data: data}\n")
        (logged / "data" / "weights.linear").write_bytes(src["model"].read_bytes())
        (logged / "data" / "preview.tflite").write_bytes(result.model_bytes)
        again = run_stage(manifest(model=str(logged), data=_data(src), chain=[{"quantize": {"mode": "dynamic"}}], name="f.yaml"))
        assert again.exit_code == 0, again.output
        assert again.report["source"]["kind"] == "linear"


def test_a_model_no_source_recognises_names_its_flavors_and_the_installed_sources(mlflow_server, manifest, run_stage, tmp_path):
    folder = tmp_path / "onnx-model"
    folder.mkdir()
    (folder / "MLmodel").write_text("flavors:\n  python_function: {}\n  onnx: {onnx_version: 1.17.0}\n")
    (folder / "model.onnx").write_bytes(b"\x08\x07not really an onnx graph")
    np.savez(tmp_path / "eval.npz", x=np.zeros((4, 8), np.float32))
    chain = [{"quantize": {"mode": "dynamic"}}]
    result = run_stage(manifest(model=str(folder), data={"evaluation": str(tmp_path / "eval.npz")}, chain=chain))
    assert result.exit_code == 2, result.output
    assert "no installed model source recognises" in result.stderr and "onnx, python_function" in result.stderr
    for kind in ("keras", "saved_model", "tflite", "pytorch"):
        assert f"{kind} (" in result.stderr
    assert "fix: install the source plugin" in result.stderr


def test_hook_register_quantization_engines(digits_source, manifest, run_stage, invoke, monkeypatch):
    """A team's own quantizer, selected by name with its own options (validated by its own schema),
    quantizes the chain's float model; the report says which engine and which options."""
    model, data = "models:/digits-cnn@champion", {"evaluation": "runs:/${source.run_id}/data/eval.npz"}
    gates = [{"metric": "accuracy", "max_drop": 0.02}]
    monkeypatch.syspath_prepend(str(ENGINE_PKG))
    import pipeline_stage_acme

    with use_plugins((pipeline_stage_acme, "acme"), (BrokenEngines(), "acme-engines")):
        chain = [{"quantize": {"mode": "weight_only", "engine": "acme_weights", "options": {"granularity": "tensor"}}}]
        result = run_stage(manifest(model=model, data=data, chain=chain, gates=gates))
        assert result.exit_code == 0, result.output
        settings = result.report["conversion"]["settings"]
        assert settings["engine"] == "acme_weights" and settings["engine_settings"] == {"granularity": "tensor"}
        info = read_flatbuffer(result.model_bytes)
        kernels = [t for t in info.tensors if t.is_constant and len(t.shape) >= 2]
        assert kernels and all(t.dtype == "INT8" and t.scales == 1 for t in kernels), kernels  # int8, one scale each
        # its options, its modes and its name are checked when the manifest is
        for options, said in (
            ({"mode": "weight_only", "engine": "acme_weights", "options": {"granularity": "row"}}, "options.granularity"),
            ({"mode": "int8", "engine": "acme_weights"}, "engine `acme_weights` offers modes weight_only"),
            ({"engine": "acme_wieghts"}, "no quantization engine `acme_wieghts` is installed"),
            ({"engine": "acme_weights", "per_channel": False}, "engine `acme_weights` takes its settings under `options`"),
        ):
            checked = invoke("validate", str(manifest(model=model, data=data, chain=[{"quantize": options}], name="bad.yaml")))
            assert checked.exit_code == 2 and said in checked.stderr, (options, checked.output)
        # an engine that raises is named, with its distribution
        broken = run_stage(
            manifest(model=model, data=data, chain=[{"quantize": {"mode": "dynamic", "engine": "acme_broken"}}], name="b.yaml")
        )
        assert broken.exit_code == 4  # a bug in the engine: not worth a retry
        assert "quantization engine `acme_broken` (distribution `acme-engines`) failed" in broken.stderr, broken.output


def test_a_float_chain_runs_with_the_quantize_plugin_taken_out(digits_source, manifest, tmp_path):
    """Block the built-in quantize plugin: no step, engine or move of it is offered, none of its code
    (nor the LiteRT Quantizer) is imported, and a float chain still runs and registers."""
    path = manifest(
        model="models:/digits-cnn@champion",
        data={"evaluation": "runs:/${source.run_id}/data/eval.npz"},
        chain=[{"analyze": {"per_layer": False}}],
        gates=[{"metric": "accuracy", "max_drop": 0.001}],
        register={"name": "digits-float-only"},
    )
    script = f"""
import json, sys
from click.testing import CliRunner
from pipeline_stage.cli import cli
from pipeline_stage.host.plugin_host import get_host
host = get_host()
run = CliRunner().invoke(cli, ["run", {str(path)!r}, "--output", {str(tmp_path / "float.tflite")!r}])
quantize = CliRunner().invoke(cli, ["validate", {str(manifest(chain=[{"quantize": {}}], model="m.keras", name="q.yaml"))!r}])
print(json.dumps({{
    "exit": run.exit_code, "output": run.output, "quantize_exit": quantize.exit_code, "quantize_said": quantize.output,
    "engines": sorted(host.engines), "steps": sorted(host.steps), "moves": sorted(host.moves),
    "imported": sorted(m for m in sys.modules if m.startswith(("pipeline_stage_plugins.quantize", "litert_quantizer"))),
}}))
"""
    env = {**os.environ, "PIPELINE_STAGE_DISABLE_PLUGINS": "quantize"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["exit"] == 0, out["output"]
    assert out["engines"] == [] and "quantize" not in out["steps"] and out["imported"] == []
    assert not {"engine", "modes", "recipes", "keep_float_ops"} & set(out["moves"])
    assert out["quantize_exit"] == 2 and "unknown step `quantize`" in out["quantize_said"]
    info = read_flatbuffer((tmp_path / "float.tflite").read_bytes())
    assert {t.dtype for t in info.tensors if t.is_constant and len(t.shape) >= 2} == {"FLOAT32"}


def test_an_engine_installed_as_a_package_is_found_by_its_entry_point(digits_source, manifest, tmp_path):
    """docs/plugins.md's in-house engine, pip-installed as its own distribution: `plugins` lists it
    with its options, and a stage in a new process uses it by name."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["install", "--no-deps", "--no-build-isolation", "--no-index", str(ENGINE_PKG)], check=True)
    exe = str(Path(sys.executable).with_name("pipeline-stage"))
    try:
        listed = json.loads(subprocess.run([exe, "plugins", "--json"], capture_output=True, text=True, check=True).stdout)
        engine = next(e for e in listed["engines"] if e["name"] == "acme_weights")
        assert engine["distribution"] == "pipeline-stage-acme 1.0.0" and engine["modes"] == ["weight_only"]
        assert [o["name"] for o in engine["options"]] == ["granularity"]
        path = manifest(
            model="models:/digits-cnn@champion",
            data={"evaluation": "runs:/${source.run_id}/data/eval.npz"},
            chain=[{"quantize": {"mode": "weight_only", "engine": "acme_weights"}}],
            gates=[{"metric": "accuracy", "max_drop": 0.02}],
        )
        out = tmp_path / "acme.tflite"
        done = subprocess.run([exe, "run", str(path), "--output", str(out), "-q"], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        kernels = [t for t in read_flatbuffer(out.read_bytes()).tensors if t.is_constant and len(t.shape) >= 2]
        assert kernels and all(t.dtype == "INT8" and t.scales > 1 for t in kernels)  # per channel, the default
    finally:
        subprocess.run(pip + ["uninstall", "-y", "pipeline-stage-acme"], check=True)
