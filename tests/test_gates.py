"""Gate rules against a baseline, in both metric directions."""

from __future__ import annotations

import pytest

from pipeline_stage.contract.gates import evaluate_gate, evaluate_gates
from pipeline_stage.manifest import Gate


@pytest.mark.parametrize(
    "rule, threshold, candidate, baseline, higher, passed",
    [
        ("max_drop", 0.01, 0.975, 0.98, True, True),
        ("max_drop", 0.01, 0.96, 0.98, True, False),
        ("max_drop", 0.5, 1.6, 1.0, False, False),  # latency went up 0.6 ms: a "drop" for lower-is-better
        ("max_drop", 0.5, 1.4, 1.0, False, True),
        ("max_relative_drop", 0.02, 0.97, 0.98, True, True),
        ("max_relative_drop", 0.005, 0.97, 0.98, True, False),
        ("min", 0.95, 0.96, None, True, True),
        ("min", 0.95, 0.94, None, True, False),
        ("max", 20000, 15992, None, False, True),
        ("max", 10000, 15992, None, False, False),
        ("max_ratio", 0.5, 15992, 43488, False, True),
        ("max_ratio", 0.3, 15992, 43488, False, False),
        ("max_ratio", 0.5, 1.0, 0.0, False, False),  # no usable baseline never passes
    ],
)
def test_gate_rules(rule, threshold, candidate, baseline, higher, passed):
    gate = Gate(metric="m", **{rule: threshold})
    result = evaluate_gate(gate, candidate, baseline, higher)
    assert result.passed is passed
    assert (result.rule, result.threshold, result.value) == (rule, threshold, candidate)


def test_all_gates_must_pass():
    gates = [Gate(metric="accuracy", max_drop=0.01), Gate(metric="size_bytes", max_ratio=0.5)]
    results, passed = evaluate_gates(
        gates,
        {"accuracy": 0.98, "size_bytes": 30000.0},
        {"accuracy": 0.98, "size_bytes": 43488.0},
        {"accuracy": True, "size_bytes": False},
    )
    assert [r.passed for r in results] == [True, False] and passed is False


def test_a_gate_on_a_metric_per_output_names_every_output_that_fails_it_worst_first():
    """What the keep_float_outputs search move ranks by: each output's own value against the rule,
    with the baseline's value of that output for relative rules."""
    candidate = {"sqnr": 3.0, "sqnr.a": 41.0, "sqnr.b": 3.0, "sqnr.c": 12.0, "mae": 0.4, "mae.a": 0.1, "mae.b": 0.4}
    baseline = {"mae": 0.1, "mae.a": 0.0, "mae.b": 0.35}
    results, passed = evaluate_gates(
        [Gate(metric="sqnr", min=20), Gate(metric="mae", max_drop=0.08)], candidate, baseline, {"sqnr": True, "mae": False}
    )
    assert not passed
    assert (results[0].worst_output, results[0].failing_outputs) == ("b", ["b", "c"])
    # mae.b rose 0.05 from its own baseline (passes); mae.a rose 0.1 (fails) though it is the smaller value
    assert (results[1].worst_output, results[1].failing_outputs) == ("b", ["a"])


@pytest.mark.parametrize(
    "rule, threshold, candidate, spread, passed",
    [
        ("max_ratio", 1.0, 1.05, 0.08, True),  # 5% slower, rounds spread 8% of the baseline: not counted
        ("max_ratio", 1.0, 1.20, 0.08, False),  # 20% slower: more than the spread
        ("max_drop", 0.0, 1.05, 0.08, True),
        ("max_drop", 0.0, 1.20, 0.08, False),
        ("max", 1.0, 1.05, 0.08, True),
    ],
)
def test_a_timed_metrics_gate_fails_only_by_more_than_the_spread(rule, threshold, candidate, spread, passed):
    """Latency measured side by side in alternating rounds: the spread of (candidate - baseline)
    across rounds is a difference the gate does not count (baseline 1.0 ms here)."""
    results, ok = evaluate_gates(
        [Gate(metric="latency_p50_ms", **{rule: threshold})],
        {"latency_p50_ms": candidate},
        {"latency_p50_ms": 1.0},
        {"latency_p50_ms": False},
        tolerance={"latency_p50_ms": spread},
    )
    assert ok is passed and results[0].tolerance == spread
