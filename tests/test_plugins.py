"""The plugin contract: hookspecs, registration checks, the plugins/schema commands, and a real
third-party plugin package discovered through the `pipeline_stage` entry-point group."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from pipeline_stage import hookimpl
from pipeline_stage.contract.errors import PluginLoadError
from pipeline_stage.contract.steps import Phase, Step
from pipeline_stage.host.plugin_host import build_host
from tests.helpers import REPO, dist_info

PLUGIN_PKG = REPO / "tests" / "plugin_pkg"


def test_plugins_json_lists_steps_with_phase_params_and_distribution(invoke):
    result = invoke("plugins", "--json")
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    quantize = next(s for s in info["steps"] if s["name"] == "quantize")
    assert quantize["phase"] == "convert"
    assert quantize["distribution"].startswith("pipeline-stage ")
    mode = next(p for p in quantize["params"] if p["name"] == "mode")
    assert mode["default"] == "int8" and "'float16'" in mode["type"] and "full integer" in mode["doc"]
    assert {m["name"] for m in info["metrics"]} >= {"accuracy", "size_bytes", "latency_p50_ms"}
    assert [d["name"] for d in info["data_loaders"]] == ["arrays", "npy", "npz", "tfrecord"]
    assert any("register_steps" in p["hooks"] for p in info["plugins"])


def test_plugins_human_listing(invoke):
    result = invoke("plugins")
    assert result.exit_code == 0
    assert "quantize [convert]" in result.stdout and "calibration_samples: integer (default 200)" in result.stdout


def test_schema_describes_the_manifest_and_each_step(invoke):
    result = invoke("schema")
    schema = json.loads(result.stdout)
    assert schema["title"] == "pipeline-stage manifest"
    assert {"model", "data", "chain", "gates", "register", "evaluation"} <= set(schema["properties"])
    titles = {item["title"] for item in schema["properties"]["chain"]["items"]["anyOf"]}
    assert "quantize" in titles
    step = next(
        i for i in schema["properties"]["chain"]["items"]["anyOf"] if i.get("type") == "object" and i["title"] == "quantize"
    )
    params = step["properties"]["quantize"]["anyOf"][0]
    assert params["properties"]["mode"]["enum"] == ["dynamic", "int8", "float16", "int16x8", "weight_only", "qat"]
    assert params["properties"]["engine"]["examples"] == ["auto", "converter", "litert", "pt2e"]  # or a third-party engine's name
    assert "search" in schema["properties"]
    assert params["additionalProperties"] is False


def test_validate_and_help_do_not_import_tensorflow(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from click.testing import CliRunner
        from pipeline_stage.cli import cli
        r = CliRunner().invoke(cli, ["validate", {str(REPO / "manifests/examples/digits-int8.yaml")!r}])
        assert r.exit_code == 0, r.output
        r = CliRunner().invoke(cli, ["plugins", "--json"]); assert r.exit_code == 0
        heavy = [m for m in ("tensorflow", "keras", "mlflow", "ai_edge_litert") if m in sys.modules]
        assert not heavy, heavy
    """)
    subprocess.run([sys.executable, "-c", code], check=True)


class _Good(Step):
    name = "good"
    phase = Phase.TFLITE


def _plugin(*classes, instance=False):
    class P:
        @hookimpl
        def register_steps(self, register):
            for cls in classes:
                register(cls() if instance else cls)

    return P()


def test_registration_rejects_instances_non_steps_nameless_and_duplicates():
    with pytest.raises(PluginLoadError, match="expected a class"):
        build_host(load_entry_points=False, extra_plugins=[(_plugin(_Good, instance=True), "inst")])
    with pytest.raises(PluginLoadError, match="not a subclass of Step"):
        build_host(load_entry_points=False, extra_plugins=[(_plugin(dict), "notstep")])
    nameless = type("Nameless", (Step,), {"phase": Phase.MODEL})
    with pytest.raises(PluginLoadError, match="without a `name`"):
        build_host(load_entry_points=False, extra_plugins=[(_plugin(nameless), "nameless")])
    twin = type("Quantize2", (Step,), {"name": "quantize", "phase": Phase.CONVERT})
    with pytest.raises(PluginLoadError) as err:
        build_host(load_entry_points=False, extra_plugins=[(_plugin(twin), "twin")])
    assert "already taken by plugin `pipeline_stage_plugins.quantize` from distribution `pipeline-stage" in str(err.value)


def test_misspelled_hook_is_refused():
    class Typo:
        @hookimpl
        def register_step(self, register):  # missing "s"
            pass

    with pytest.raises(PluginLoadError, match="register_step"):
        build_host(load_entry_points=False, extra_plugins=[(Typo(), "typo")])


def test_plugin_that_fails_to_import_names_its_distribution(tmp_path, run_cli):
    site = dist_info(
        tmp_path / "site",
        "pipeline-stage-broken",
        "1.2.0",
        "broken = pipeline_stage_broken",
        {"pipeline_stage_broken": "import not_a_real_module\n"},
    )
    result = run_cli("plugins", env={"PYTHONPATH": str(site)})
    assert result.returncode == 2, result.stderr
    assert (
        "plugin `broken` (pipeline_stage_broken) from distribution `pipeline-stage-broken 1.2.0` failed to import"
        in result.stderr
    )
    assert "ModuleNotFoundError" in result.stderr and "Traceback" not in result.stderr
    # operators can switch it off
    ok = run_cli("plugins", env={"PYTHONPATH": str(site), "PIPELINE_STAGE_DISABLE_PLUGINS": "pipeline-stage-broken"})
    assert ok.returncode == 0, ok.stderr


def test_plugin_registering_a_taken_name_names_both_distributions(tmp_path, run_cli):
    code = (
        "from pipeline_stage import Step, Phase, hookimpl\n"
        "class Q(Step):\n    name = 'quantize'\n    phase = Phase.CONVERT\n"
        "@hookimpl\ndef register_steps(register):\n    register(Q)\n"
    )
    site = dist_info(
        tmp_path / "site", "pipeline-stage-dupe", "0.1.0", "dupe = pipeline_stage_dupe", {"pipeline_stage_dupe": code}
    )
    result = run_cli("validate", str(REPO / "manifests/examples/digits-int8.yaml"), env={"PYTHONPATH": str(site)})
    assert result.returncode == 2
    assert "plugin `dupe` (distribution `pipeline-stage-dupe 0.1.0`) registers step `quantize`" in result.stderr
    assert "already taken by plugin `pipeline_stage_plugins.quantize` from distribution `pipeline-stage" in result.stderr


@pytest.fixture(scope="module")
def installed_stamp_plugin():
    """pip-install tests/plugin_pkg into this venv (offline, no deps), uninstall afterwards."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["install", "--no-deps", "--no-build-isolation", "--no-index", str(PLUGIN_PKG)], check=True)
    try:
        yield
    finally:
        subprocess.run(pip + ["uninstall", "-y", "pipeline-stage-stamp"], check=True)


def test_installed_plugin_is_listed_validated_and_run(
    installed_stamp_plugin, digits_source, tmp_path, run_stage, manifest, run_cli
):
    listed = json.loads(run_cli("plugins", "--json").stdout)
    stamp = next(s for s in listed["steps"] if s["name"] == "stamp")
    assert stamp["distribution"] == "pipeline-stage-stamp 0.3.0" and stamp["phase"] == "tflite"
    assert {p["name"] for p in stamp["params"]} == {"value", "key"}
    text = (
        "model: models:/digits-cnn@champion\n"
        "data: {calibration: 'runs:/${source.run_id}/data/calib.npz', evaluation: 'runs:/${source.run_id}/data/eval.npz'}\n"
        "chain:\n  - quantize: {mode: int8}\n  - stamp: {value: ci-1234, key: build}\n"
        "gates:\n  - {metric: accuracy, max_drop: 0.02}\n"
    )
    path = manifest(text)
    assert run_cli("validate", str(path)).returncode == 0
    bad = manifest(text.replace("value: ci-1234, ", ""), name="bad.yaml")
    result = run_cli("validate", str(bad))
    assert result.returncode == 2 and "chain[1].stamp.value" in result.stderr
    result = run_stage(path)
    assert result.exit_code == 0, result.output
    from pipeline_stage.engine.flatbuffer import read

    assert read(result.model_bytes).metadata["build"] == b"ci-1234"
    assert result.report["steps"][1]["name"] == "stamp"
