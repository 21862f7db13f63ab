"""The public plugin API and the host's contract, held by fast tests (no TensorFlow, no server):
what plugins may import, that every hook is documented and exercised, how registrations are
validated, the report's schema, and the pure rules (ranking, Pareto front, alias rule)."""

from __future__ import annotations

import ast
import inspect
import json
import re
from types import SimpleNamespace

import pytest

import pipeline_stage
from pipeline_stage import DataLoader, Dataset, Metric, Phase, SearchMove, Step, hookimpl
from pipeline_stage.contract import hookspecs
from pipeline_stage.contract.errors import PluginLoadError
from pipeline_stage.contract.report import Report
from pipeline_stage.host.plugin_host import build_host
from pipeline_stage.host.plugin_listing import describe
from pipeline_stage.manifest import parse_manifest
from tests.helpers import REPO, dist_info

HOOKS = {name: f for name, f in vars(hookspecs).items() if hasattr(f, "pipeline_stage_spec")}
PLUGIN_GUIDE = (REPO / "docs" / "plugins.md").read_text()
MLFLOW_PAGE = (REPO / "docs" / "mlflow.md").read_text()


def test_plugins_import_only_the_public_api():
    """Every built-in plugin imports from `pipeline_stage` itself, and only names it exports."""
    public = set(pipeline_stage.__all__)
    for path in sorted((REPO / "plugins").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline_stage_plugins."):
                continue  # a plugin's own modules (fuse's graph walks), as any plugin package has
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline_stage"):
                assert node.module == "pipeline_stage", f"{path.name}:{node.lineno} imports from {node.module}"
                outside = [a.name for a in node.names if a.name not in public]
                assert not outside, f"{path.name}:{node.lineno} imports {outside}, not in pipeline_stage.__all__"
            elif isinstance(node, ast.Import):
                inner = [a.name for a in node.names if a.name.startswith("pipeline_stage.")]
                assert not inner, f"{path.name}:{node.lineno} imports {inner}"


def test_every_public_name_resolves():
    for name in pipeline_stage.__all__:
        assert getattr(pipeline_stage, name) is not None, name


def test_every_hook_signature_is_in_the_plugin_guide():
    """datasette's rule: the docs show each hook as it is called."""
    for name, spec in HOOKS.items():
        signature = f"{name}({', '.join(inspect.signature(spec).parameters)})"
        assert f"`{signature}`" in PLUGIN_GUIDE, signature


def test_every_hook_is_documented_with_its_params():
    for name, spec in HOOKS.items():
        doc = inspect.getdoc(spec) or ""
        for arg in inspect.signature(spec).parameters:
            assert f":param {arg}:" in doc, (name, arg)


def test_every_hook_is_exercised_by_a_test():
    """datasette's rule: for every hook, a test whose name carries the hook's name."""
    names = set()
    for path in (REPO / "tests").glob("test_*.py"):
        names |= set(re.findall(r"^def (test_\w+)", path.read_text(), flags=re.M))
    for hook in HOOKS:
        assert any(hook in test for test in names), f"no test named after hook `{hook}` (e.g. test_hook_{hook})"


# -- registration hooks: each registration is validated and names its distribution -------------------
class _Csv(DataLoader):
    name = "csv"
    suffixes = (".csv",)

    def load(self, path, source):
        import numpy as np

        return Dataset(x=np.loadtxt(path, delimiter=",", ndmin=2), y=None, source=source)


class _Ones(Metric):
    """Always one."""

    name = "ones"
    uses = "flatbuffer"
    runs_model = False

    def compute(self, evaluation) -> float:
        return 1.0


class _Tag(Step):
    """Does nothing to the flatbuffer."""

    name = "noop_tflite"
    phase = Phase.TFLITE

    def apply(self, model_bytes, ctx):
        return model_bytes


class _Everything:
    @hookimpl
    def register_steps(self, register):
        register(_Tag)

    @hookimpl
    def register_metrics(self, register):
        register(_Ones)

    @hookimpl
    def register_data_loaders(self, register):
        register(_Csv)


def test_hook_register_steps_register_metrics_register_data_loaders():
    host = build_host(load_entry_points=False, extra_plugins=[(_Everything(), "everything")])
    assert host.steps["noop_tflite"].cls is _Tag and host.steps["noop_tflite"].plugin == "everything"
    assert host.metrics["ones"].cls is _Ones and host.loader_for(".CSV").cls is _Csv
    listed = describe(host)
    assert "ones" in {m["name"] for m in listed["metrics"]} and "csv" in {d["name"] for d in listed["data_loaders"]}


class _Layer:
    pass


def test_hook_register_keras_objects_is_validated():
    class Good:
        @hookimpl
        def register_keras_objects(self, register):
            register("pkg>Layer", _Layer)

    host = build_host(load_entry_points=False, extra_plugins=[(Good(), "good")])
    assert host.keras_objects["pkg>Layer"] is _Layer

    class Clash:
        @hookimpl
        def register_keras_objects(self, register):
            register("pkg>Layer", object)

    with pytest.raises(PluginLoadError, match="Keras object `pkg>Layer`, but that name is already taken by plugin `good`"):
        build_host(load_entry_points=False, extra_plugins=[(Good(), "good"), (Clash(), "clash")])

    class Broken:
        @hookimpl
        def register_keras_objects(self, register):
            raise RuntimeError("no such layer module")

    # it used to escape as an unexpected failure (exit 1); now it is a plugin load error (exit 2)
    with pytest.raises(PluginLoadError, match="plugin `broken` .* failed in register_keras_objects: RuntimeError"):
        build_host(load_entry_points=False, extra_plugins=[(Broken(), "broken")])


class _Noop(SearchMove):
    """Never proposes anything."""

    name = "noop"
    kind = "alternative"


def test_search_moves_are_registered_validated_and_chosen_by_name():
    class Moves:
        @hookimpl
        def register_search_moves(self, register):
            register(_Noop)

    host = build_host(load_entry_points=False, extra_plugins=[(Moves(), "moves")])
    assert list(host.moves)[-1] == "noop"
    assert {"fuse", "engine", "keep_float_ops", "keep_float_nodes"} <= set(host.moves)
    bad = type("Bad", (SearchMove,), {"name": "bad", "kind": "sideways"})

    class BadMoves:
        @hookimpl
        def register_search_moves(self, register):
            register(bad)

    with pytest.raises(PluginLoadError, match="no valid `kind`"):
        build_host(load_entry_points=False, extra_plugins=[(BadMoves(), "bad")])
    text = (
        "model: models:/m/1\ndata: {calibration: c.npz, evaluation: e.npz}\nchain:\n  - quantize: {mode: int8}\n"
        "gates:\n  - {metric: accuracy, max_drop: 0.01}\nsearch:\n  strategy: auto\n  moves: [noop, keep_float_nodes]\n"
    )
    loaded = parse_manifest(text, host)
    assert loaded.moves == ["noop", "keep_float_nodes"]
    with pytest.raises(Exception, match="unknown search move `nope`"):
        parse_manifest(text.replace("noop,", "nope,"), host)


def test_misspelled_hook_stops_the_stage_naming_its_distribution(tmp_path, run_cli):
    code = "from pipeline_stage import hookimpl\n@hookimpl\ndef register_step(register):  # missing s\n    pass\n"
    site = dist_info(
        tmp_path / "site", "pipeline-stage-typo", "0.2.0", "typo = pipeline_stage_typo", {"pipeline_stage_typo": code}
    )
    result = run_cli("validate", str(REPO / "manifests/examples/digits-int8.yaml"), env={"PYTHONPATH": str(site)})
    assert result.returncode == 2, result.stderr
    assert "plugin `typo` (distribution `pipeline-stage-typo 0.2.0`)" in result.stderr and "register_step" in result.stderr
    assert "Traceback" not in result.stderr


def test_old_documented_flatbuffer_path_still_imports_and_warns():
    """The shim policy (docs/plugins.md, "Compatibility"): a shim works for one release, with a warning."""
    import importlib
    import sys

    sys.modules.pop("pipeline_stage.flatbuffer", None)
    with pytest.warns(DeprecationWarning, match="goes in pipeline-stage 0.2.0"):
        shim = importlib.import_module("pipeline_stage.flatbuffer")
    assert shim.add_metadata is pipeline_stage.add_metadata


def test_a_record_read_like_a_dict_warns():
    from pipeline_stage import StepRecord

    record = StepRecord(name="quantize", phase="convert", params={})
    with pytest.warns(DeprecationWarning, match=r"read `record.name`"):
        assert record["name"] == "quantize"
    assert record.name == "quantize"


def test_type_checkers_see_every_public_name():
    """The TYPE_CHECKING block of `pipeline_stage` imports every name `__all__` exports."""
    tree = ast.parse((REPO / "pipeline_stage" / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    seen = {a.asname or a.name for node in block.body if isinstance(node, ast.ImportFrom) for a in node.names}
    assert set(pipeline_stage.__all__) - {"__version__"} <= seen, set(pipeline_stage.__all__) - seen


def test_use_plugins_runs_with_a_chosen_set_and_restores_the_host():
    from pipeline_stage import use_plugins
    from pipeline_stage.host.plugin_host import get_host

    class Marker(Step):
        """A step only this test registers."""

        name = "marker_step"
        phase = Phase.TFLITE

    class Plugin:
        @hookimpl
        def register_steps(self, register):
            register(Marker)

    before = get_host()
    with use_plugins(Plugin()) as host:
        assert get_host() is host and "marker_step" in host.steps and "quantize" in host.steps
    assert get_host() is before and "marker_step" not in before.steps


# -- the typed report ---------------------------------------------------------------------------------
def test_schema_report_prints_the_report_json_schema(invoke):
    result = invoke("schema", "--report")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert set(schema["properties"]) == set(Report.model_fields)
    assert {"passed", "baseline", "candidate", "gates", "steps", "registered", "search", "timing"} <= set(schema["properties"])
    assert "GateResult" in schema["$defs"] and "StepRecord" in schema["$defs"]


def test_the_mlflow_page_lists_every_report_key():
    section = MLFLOW_PAGE.split("`--report PATH` writes", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r"^- `(\w+)`", section, flags=re.M))
    assert listed == set(Report.model_fields), listed ^ set(Report.model_fields)


def test_search_objective_may_be_one_name():
    host = build_host(load_entry_points=False)
    text = (
        "model: models:/m/1\ndata: {calibration: c.npz, evaluation: e.npz}\nchain:\n  - quantize: {mode: int8}\n"
        "gates:\n  - {metric: accuracy, max_drop: 0.01}\nsearch: {strategy: auto, objective: latency_p50_ms}\n"
    )
    assert parse_manifest(text, host).manifest.search.objective == ["latency_p50_ms"]


# -- pure rules -------------------------------------------------------------------------------------------
def _trial(index, status="passed", shortfall=0.0, **metrics):
    return SimpleNamespace(index=index, status=status, shortfall=shortfall, metrics=metrics)


def test_trials_timed_under_different_load_are_ranked_on_one_scale_and_gated_on_their_own_pair():
    from pipeline_stage.contract.report import TimedComparison
    from pipeline_stage.run.ranking import timed_on_one_scale

    def timed(candidate, baseline, spread):
        return TimedComparison(
            metric="latency_p50_ms", rounds=1, runs_per_round=1, baseline=baseline, candidate=candidate,
            baseline_rounds=[baseline], candidate_rounds=[candidate], ratio=candidate / baseline, spread=spread,
        )  # fmt: skip

    stage = {"latency_p50_ms": 1.0, "accuracy": 0.98}
    # timed while the machine was busy: slower in absolute terms, but half the baseline beside it
    busy = timed_on_one_scale({"latency_p50_ms": 2.0, "accuracy": 0.97}, [timed(2.0, 4.0, 0.1)], stage)
    quiet = timed_on_one_scale({"latency_p50_ms": 1.5, "accuracy": 0.97}, [timed(1.5, 1.0, 0.2)], stage)
    assert busy[0] == {"latency_p50_ms": 0.5, "accuracy": 0.97} and quiet[0]["latency_p50_ms"] == 1.5
    ranked, gated, baseline, spread = busy
    assert gated["latency_p50_ms"] == 2.0 and baseline == {"latency_p50_ms": 4.0, "accuracy": 0.98}
    assert spread == {"latency_p50_ms": 0.1}
    # nothing timed: the trial's own numbers against the stage's baseline
    assert timed_on_one_scale({"accuracy": 0.9}, [], stage) == ({"accuracy": 0.9}, {"accuracy": 0.9}, stage, {})


def test_ranking_uses_the_objective_in_order_with_tie_tolerance():
    from pipeline_stage.run.ranking import closest, rank

    higher = {"latency_p50_ms": False, "size_bytes": False, "accuracy": True}
    a, b = _trial(1, latency_p50_ms=1.00, size_bytes=900), _trial(2, latency_p50_ms=1.04, size_bytes=500)
    # 4% apart is a tie at 5% tolerance: the next objective (size) decides
    assert [t.index for t in rank([a, b], ["latency_p50_ms", "size_bytes"], higher, 0.05)] == [2, 1]
    # with no tolerance latency decides alone
    assert [t.index for t in rank([a, b], ["latency_p50_ms", "size_bytes"], higher, 0.0)] == [1, 2]
    # higher-is-better metrics rank the other way; full ties fall back to trial order
    c, d = _trial(3, accuracy=0.97), _trial(4, accuracy=0.99)
    assert [t.index for t in rank([c, d], ["accuracy"], higher, 0.0)] == [4, 3]
    assert [t.index for t in rank([_trial(6, accuracy=0.9), _trial(5, accuracy=0.9)], ["accuracy"], higher, 0.0)] == [5, 6]
    trials = [_trial(1, "failed", 0.3), _trial(2, "error", float("inf")), _trial(3, "failed", 0.1), _trial(4, "failed", 0.1)]
    assert closest(trials).index == 3 and closest([_trial(1, "error")]) is None


def test_a_pass_gains_only_when_it_beats_float_on_an_objective_metric():
    """What settles a search: a model no smaller than float (every weight kept float) gains nothing,
    whatever else it passes; within the tie tolerance is no gain either."""
    from pipeline_stage.run.ranking import gains

    higher = {"size_bytes": False, "latency_p50_ms": False, "accuracy": True}
    float_model = {"size_bytes": 69_124, "latency_p50_ms": 1.0, "accuracy": 0.9}
    assert not gains(_trial(1, size_bytes=69_712), float_model, ["size_bytes"], higher, 0.05)
    assert not gains(_trial(2, size_bytes=67_000), float_model, ["size_bytes"], higher, 0.05)  # 3%: a tie
    assert gains(_trial(3, size_bytes=22_064), float_model, ["size_bytes"], higher, 0.05)
    assert gains(_trial(4, size_bytes=69_712, accuracy=0.99), float_model, ["size_bytes", "accuracy"], higher, 0.05)
    assert gains(_trial(5, latency_p50_ms=0.5), float_model, ["latency_p50_ms"], higher, 0.05)


def test_pareto_front_keeps_what_nothing_beats_on_both_axes():
    from pipeline_stage.reporting.html import pareto

    # (size, accuracy): smaller is better on x, higher on y
    points = [(100, 0.90), (50, 0.90), (60, 0.95), (200, 0.99), (70, 0.94)]
    assert pareto(points) == [1, 2, 3]


def _version(version, passed=True, alias="edge", priority=0, status="READY"):
    return SimpleNamespace(
        version=version,
        status=status,
        tags={
            "pipeline_stage.passed": str(passed).lower(),
            "pipeline_stage.alias": alias,
            "pipeline_stage.priority": str(priority),
        },
    )


def test_alias_rule_newest_passing_of_the_highest_priority():
    from pipeline_stage.mlflow_io.registry_rules import alias_winner

    versions = [
        _version(1),
        _version(2, priority=1),
        _version(3),
        _version(4, passed=False, priority=5),
        _version(5, status="PENDING_REGISTRATION", priority=9),
        _version(6, alias="other", priority=9),
    ]
    assert alias_winner(versions, "edge").version == 2
    assert alias_winner([_version(1), _version(3), _version(2)], "edge").version == 3
    assert alias_winner([_version(1, passed=False)], "edge") is None


def test_failure_message_names_each_failed_gate_and_what_was_registered():
    from pipeline_stage.contract.gates import Gate, evaluate_gates
    from pipeline_stage.contract.report import ManifestRef, SourceRef

    gates, passed = evaluate_gates(
        [Gate(metric="accuracy", max_drop=0.01), Gate(metric="size_bytes", max_ratio=0.5)],
        {"accuracy": 0.9, "size_bytes": 10.0},
        {"accuracy": 0.98, "size_bytes": 40.0},
        {"accuracy": True, "size_bytes": False},
    )
    report = Report(
        manifest=ManifestRef(path="m.yaml", chain_digest="d", sha256="s"),
        source=SourceRef(uri="models:/m/1"),
        tracking_uri="x",
        package_version="0",
        gates=gates,
        passed=passed,
    )
    assert not passed
    assert report.failure_message() == "gate failed: accuracy max_drop 0.01 (value 0.9); nothing registered"
    assert gates[1].tag_text() == "pass (value 10, threshold 0.5)"
    assert "candidate" not in report.to_json_data() and report.to_json_data()["passed"] is False
