"""The auto search learns from its trials (a third-party audio model's case: one op whose int8
error dwarfs the rest, outputs int8 cannot serve, a latency-first objective): the dominant op is
kept float first, a refinement path that cannot reach the gate in the budget left is abandoned for
the next tier, no proposal the engine cannot run costs a trial, and a passing model is registered
with the default budget."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest

from pipeline_stage import read_flatbuffer


@pytest.fixture(scope="module")
def spectrum(tmp_path_factory) -> dict:
    from pipeline_stage.demo import build_log_spectrum_trunk

    folder = tmp_path_factory.mktemp("spectrum")
    flatbuffer, inputs = build_log_spectrum_trunk()
    (folder / "spectrum.tflite").write_bytes(flatbuffer)
    np.savez(folder / "calib.npz", x=inputs(200))
    evaluation = inputs(300)
    np.savez(folder / "eval.npz", x=evaluation)
    data = {"calibration": str(folder / "calib.npz"), "evaluation": str(folder / "eval.npz")}
    return {"model": str(folder / "spectrum.tflite"), "data": data, "float": flatbuffer, "eval": evaluation}


def _sqnr(model: bytes, reference: bytes, x: np.ndarray) -> dict[str, float]:
    """Each output's SQNR (dB) of `model` against `reference` on `x`, by the LiteRT interpreter."""
    from ai_edge_litert.interpreter import Interpreter

    def outputs(flatbuffer: bytes) -> dict[str, np.ndarray]:
        runner = Interpreter(model_content=flatbuffer).get_signature_runner()
        rows = [runner(spectrum=x[i : i + 1]) for i in range(len(x))]
        return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}

    want, got = outputs(reference), outputs(model)
    return {k: float(10 * np.log10(np.sum(want[k] ** 2) / np.sum((want[k] - got[k]) ** 2))) for k in want}


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
    registered = Path(mlflow.artifacts.download_artifacts(artifact_uri=result.report["registered"]["tflite_uri"])).read_bytes()
    assert min(_sqnr(registered, spectrum["float"], spectrum["eval"][:120]).values()) >= 20
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
