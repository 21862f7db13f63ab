"""Gates: per-metric rules that the candidate must meet against the baseline."""

from __future__ import annotations

import math
from typing import Any

from pipeline_stage.manifest import Gate


def evaluate_gate(gate: Gate, candidate: float, baseline: float | None, higher_is_better: bool) -> dict[str, Any]:
    """One verdict: metric, rule, threshold, value, baseline, passed (and what was compared)."""
    rule, threshold = gate.rule, gate.threshold
    # A "drop" is a loss in the metric's good direction: for lower-is-better metrics, an increase.
    drop = None
    if baseline is not None:
        drop = (baseline - candidate) if higher_is_better else (candidate - baseline)
    if rule == "min":
        compared, passed = candidate, candidate >= threshold
    elif rule == "max":
        compared, passed = candidate, candidate <= threshold
    elif rule == "max_drop":
        compared = drop
        passed = drop is not None and drop <= threshold + 1e-12
    elif rule == "max_relative_drop":
        compared = None if drop is None or baseline == 0 else drop / abs(baseline)
        passed = compared is not None and compared <= threshold + 1e-12
    elif rule == "max_ratio":
        compared = None if not baseline else candidate / baseline
        passed = compared is not None and compared <= threshold
    else:  # pragma: no cover - the manifest model admits only the rules above
        raise ValueError(rule)
    if candidate is None or (isinstance(candidate, float) and math.isnan(candidate)):
        passed = False
    return {
        "metric": gate.metric,
        "rule": rule,
        "threshold": threshold,
        "value": candidate,
        "baseline": baseline,
        "compared": compared,
        "passed": bool(passed),
    }


def evaluate_gates(gates: list[Gate], candidate: dict[str, float], baseline: dict[str, float],
                   higher_is_better: dict[str, bool]) -> tuple[list[dict[str, Any]], bool]:
    results = [evaluate_gate(g, candidate[g.metric], baseline.get(g.metric), higher_is_better[g.metric]) for g in gates]
    return results, all(r["passed"] for r in results)
