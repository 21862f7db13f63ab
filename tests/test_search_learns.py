"""The auto search learns from its trials (a third-party audio model's case: one op whose int8
error dwarfs the rest, outputs int8 cannot serve, a latency-first objective): the dominant op is
kept float first, a refinement path that cannot reach the gate in the budget left is abandoned for
the next tier, no proposal the engine cannot run costs a trial, and a passing model is registered
with the default budget."""

from __future__ import annotations

import pytest

from pipeline_stage import read_flatbuffer
from tests.helpers import demo_tflite_case, signature_outputs, sqnr_db, tflite_of


@pytest.fixture(scope="module")
def spectrum(tmp_path_factory) -> dict:
    from pipeline_stage.demo import build_log_spectrum_trunk

    case = demo_tflite_case(tmp_path_factory.mktemp("spectrum"), "spectrum", build_log_spectrum_trunk)
    return {**case, "model": str(case["model"])}


def test_a_latency_first_search_keeps_the_dominant_op_float_then_leaves_int8_for_a_passing_recipe(
    spectrum, mlflow_server, manifest, run_stage
):
    path = manifest(
        model=spectrum["model"],
        data=spectrum["data"],
        chain=[{"quantize": {"mode": "int8"}}],
        gates=[{"metric": "fidelity_sqnr_db", "min": 20}],
        search={"strategy": "auto", "objective": ["latency_p50_ms", "size_bytes"]},
        register={"name": "spectrum-search", "alias": "edge"},
    )
    result = run_stage(path)
    assert result.exit_code == 0, result.output
    search = result.report["search"]
    trials = search["trials"]
    assert len(trials) <= search["budget"]["trials"] == 12
    assert not [t for t in trials if t["status"] == "error"], [(t["origin"], t["error"]) for t in trials]
    # the first refinement keeps exactly the op whose error dwarfs the rest, and what feeds it
    first, second = trials[0], trials[1]
    assert first["origin"] == "as written" and first["status"] == "failed"
    worst = search["as_written_per_layer"][0]
    assert worst["op"] == "LOG" and worst["rmse/scale"] > 100 * search["as_written_per_layer"][1]["rmse/scale"]
    assert "the dominant error first" in second["origin"] and worst["tensor"] in second["chain"]
    # int8 refinements creep: the path is abandoned for the recipes tier, which passes
    assert any("cannot close" in p["stopped_because"] for p in search["paths"]), search["paths"]
    winner = next(t for t in trials if t["index"] == search["winner"])
    assert winner["origin"].startswith("recipe "), winner
    registered = tflite_of(result.report["registered"])
    x = {"spectrum": spectrum["eval"][:120]}
    assert min(sqnr_db(signature_outputs(spectrum["float"], x), signature_outputs(registered, x)).values()) >= 20
    assert len(registered) < len(spectrum["float"]) and "INT8" in read_flatbuffer(registered).constant_dtypes()


def test_an_error_orders_of_magnitude_above_the_rest_is_singled_out_with_what_feeds_it():
    from pipeline_stage import TrialView
    from pipeline_stage.contract.report import StepRecord
    from pipeline_stage_plugins.quantize.moves import KeepFloatNodes

    def view(errors: dict[str, float]) -> TrialView:
        rows = [{"op": "OP", "tensor": t, "rmse/scale": e, "inputs": [f"{t}/in"]} for t, e in errors.items()]
        rows += [{"op": "ADD", "tensor": f"{t}/in", "rmse/scale": 0.0, "inputs": []} for t in errors]
        record = StepRecord(name="analyze", phase="tflite", params={}, metrics={}, seconds=0.0, notes={"per_layer": rows})
        return TrialView(chain=[], steps=(record,), passed=False)

    move = KeepFloatNodes()
    assert move.dominant(view({"log": 7.9e7, "fc": 2.9, "tanh": 0.5})) == ["log", "log/in"]
    assert move.dominant(view({"log": 7.9e7, "exp": 3e6, "fc": 2.9})) == ["log", "exp", "log/in", "exp/in"]
    assert move.dominant(view({"a": 3.0, "b": 2.9, "c": 0.5})) == []  # nothing stands out


def test_a_path_that_cannot_close_the_shortfall_in_the_budget_left_is_out_of_reach():
    from types import SimpleNamespace

    from pipeline_stage.run.strategies import _out_of_reach

    start, creeping = SimpleNamespace(shortfall=0.49), SimpleNamespace(shortfall=0.48)
    assert _out_of_reach(start, creeping, trials=1, left=10) == ""  # one trial is not yet a trend
    assert "cannot close the shortfall of 0.48" in _out_of_reach(start, creeping, trials=2, left=8)
    closing = SimpleNamespace(shortfall=0.2)
    assert _out_of_reach(start, closing, trials=2, left=8) == ""  # 0.145 per trial: 8 trials close 0.2
    assert _out_of_reach(start, SimpleNamespace(shortfall=float("inf")), trials=3, left=1) == ""
