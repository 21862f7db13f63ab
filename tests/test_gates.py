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
