"""Bad input found at run time, unreachable servers and crashing plugins: clear errors, exit codes,
and never a registered version left behind."""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
import numpy as np
import pytest

from pipeline_stage import use_plugins
from tests.fake_plugins import Recorder, Steps
from tests.figures import add
from tests.helpers import REPO
from tests.services import free_port

# The stage these tests break: the digits CNN, dynamic range, one gate, an alias that must never move.
BAD_INPUT = dict(
    model="models:/digits-cnn@champion",
    data={"evaluation": "runs:/${source.run_id}/data/eval.npz"},
    chain=[{"quantize": {"mode": "dynamic"}}],
    gates=[{"metric": "accuracy", "max_drop": 0.05}],
    register={"name": "digits-bad-input", "alias": "should-not-move"},
)


@pytest.fixture
def test_plugins(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tests" / "plugin_pkg"))
    import pipeline_stage_stamp

    recorder = Recorder()
    with use_plugins((Steps(), "fake-steps"), (pipeline_stage_stamp, "stamp"), (recorder, "recorder")):
        yield recorder


def _bad_data(tmp_path, name, **arrays) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_bad_inputs_at_run_time_exit_2_and_register_nothing(
    digits_source, digits_data, tmp_path, run_stage, manifest, versions_of
):
    x, y = digits_data.evaluation
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    cases = {
        "missing model": (dict(model="models:/no-such-model@champion"), "does not exist"),
        "missing version": (dict(model="models:/digits-cnn/999"), "does not exist"),
        "missing run": (dict(model="runs:/0123456789abcdef0123456789abcdef/model"), "does not exist"),
        "missing artifact": (dict(evaluation="runs:/${source.run_id}/data/missing.npz"), "cannot download"),
        "missing local file": (dict(evaluation=str(tmp_path / "nope.npz")), "does not exist"),
        "wrong shape": (
            dict(evaluation=_bad_data(tmp_path, "shape.npz", x=np.zeros((4, 28, 28, 1), np.float32), y=np.zeros(4))),
            "shape (28, 28, 1), but the model takes (8, 8, 1)",
        ),
        "no labels": (dict(evaluation=_bad_data(tmp_path, "nolabels.npz", x=x[:10])), "no labels `y`"),
        "mismatched rows": (dict(evaluation=_bad_data(tmp_path, "rows.npz", x=x[:10], y=y[:7])), "`x` has 10 rows but `y` has 7"),
        "empty": (
            dict(evaluation=_bad_data(tmp_path, "empty.npz", x=np.zeros((0, 8, 8, 1), np.float32), y=np.zeros(0))),
            "no samples",
        ),
        "no x": (dict(evaluation=_bad_data(tmp_path, "nox.npz", features=x[:10], y=y[:10])), "has no array for model input"),
        "corrupt": (dict(evaluation=corrupt), "not a readable .npz"),
        "wrong format": (dict(evaluation=manifest("a,b\n", name="data.csv")), "no data loader reads `.csv`"),
        "string features": (
            dict(evaluation=_bad_data(tmp_path, "str.npz", x=np.array([["a"]] * 3), y=np.zeros(3))),
            "expected a numeric array",
        ),
    }
    for label, (kwargs, needle) in cases.items():
        changed = {"model": str(kwargs["model"])} if "model" in kwargs else {"data": {"evaluation": str(kwargs["evaluation"])}}
        path = manifest(**{**BAD_INPUT, **changed})
        result = run_stage(path)
        add("bad inputs tried: run-time data and URIs")
        assert result.exit_code == 2, (label, result.output)
        assert needle in result.stderr, (label, result.stderr)
        assert "Traceback" not in result.stderr
    assert versions_of("digits-bad-input") == []


def test_unreachable_tracking_server_exits_1_in_bounded_time(tmp_path, run_stage, manifest):
    path = manifest(**BAD_INPUT)
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    result = run_stage(path, "--tracking-uri", uri)
    assert result.exit_code == 1, result.output
    assert uri in result.stderr and "unreachable" in result.stderr
    assert time.monotonic() - start < 30


def test_hook_on_stage_error_and_a_crashing_plugin_names_step_and_distribution(
    digits_source, tmp_path, test_plugins, run_stage, versions_of, manifest
):
    path = manifest(**{**BAD_INPUT, "chain": [{"quantize": {"mode": "dynamic"}}, {"explode": {}}]})
    result = run_stage(path)
    assert result.exit_code == 4, result.output  # a plugin's bug: a retry would repeat it, so not 1
    assert "step 2 `explode` (distribution `fake-steps`) failed: RuntimeError: boom" in result.stderr
    report = result.report
    assert "boom" in report["error"]
    assert mlflow.MlflowClient().get_run(report["run_id"]).info.status == "FAILED"
    assert ("on_stage_error", "PluginError") in test_plugins.calls
    assert versions_of("digits-bad-input") == []


def test_hooks_before_step_after_step_after_gates_after_register_across_all_phases(
    digits_source, tmp_path, test_plugins, run_stage, manifest
):
    chain = [{"identity_model": {}}, {"quantize": {"mode": "float16"}}, {"stamp": {"value": "build-42"}}]
    sections = {**BAD_INPUT, "chain": chain, "register": {"name": "digits-all-phases", "alias": "ok"}}
    result = run_stage(manifest(**sections, evaluation={"per_step": ["accuracy", "size_bytes"]}))
    assert result.exit_code == 0, result.output
    report = result.report
    steps = report["steps"]
    assert [s["phase"] for s in steps] == ["model", "convert", "tflite"]
    assert set(steps[0]["metrics"]) == {"accuracy"}  # size is a flatbuffer metric: none before conversion
    assert steps[0]["metrics"]["accuracy"] == pytest.approx(report["baseline"]["accuracy"])
    assert set(steps[1]["metrics"]) == set(steps[2]["metrics"]) == {"accuracy", "size_bytes"}
    assert steps[2]["notes"] == {"stamped": "build_stamp"}
    names = [c[0] for c in test_plugins.calls]
    assert names == ["before_step", "after_step"] * 3 + ["after_gates", "after_register"]
    # observers get typed, read-only records and a read-only context
    record, context = test_plugins.seen["after_step"]
    assert type(record).__name__ == "StepRecord" and record.name == "stamp" and context.run_id == report["run_id"]
    with pytest.raises(Exception):
        record.metrics = {}
    with pytest.raises(Exception):
        context.quiet = True
    assert test_plugins.seen["after_register"].uri == report["registered"]["uri"]
    reg = report["registered"]
    tags = mlflow.MlflowClient().get_model_version(reg["name"], reg["version"]).tags
    assert tags["stamp.build_stamp"] == "build-42"
    from pipeline_stage.engine.flatbuffer import read

    local = mlflow.artifacts.download_artifacts(artifact_uri=reg["tflite_uri"])
    assert read(Path(local).read_bytes()).metadata["build_stamp"] == b"build-42"
