"""Gates: per-metric rules that the candidate must meet against the baseline.

The rules are pure functions of measured numbers (no TensorFlow, no MLflow), so they are unit-tested
on given values; a verdict is a :class:`~pipeline_stage.contract.report.GateResult`.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline_stage.contract.report import GateResult

GATE_RULES = ("max_drop", "max_relative_drop", "min", "max", "max_ratio")


class Gate(BaseModel):
    """One rule on one metric (a manifest's `gates:` item); the candidate must satisfy it or nothing is promoted."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field(description="A registered metric, e.g. accuracy, size_bytes, latency_p50_ms.")
    max_drop: float | None = Field(
        None, ge=0, description="Largest allowed drop vs the baseline (an increase for lower-is-better metrics)."
    )
    max_relative_drop: float | None = Field(None, ge=0, le=1, description="Largest allowed drop as a fraction of the baseline.")
    min: float | None = Field(None, description="Smallest allowed candidate value.")
    max: float | None = Field(None, description="Largest allowed candidate value.")
    max_ratio: float | None = Field(None, gt=0, description="Largest allowed candidate / baseline ratio.")

    @model_validator(mode="after")
    def _one_rule(self) -> "Gate":
        given = [r for r in GATE_RULES if getattr(self, r) is not None]
        if len(given) != 1:
            found = ", ".join(given) if given else "none"
            raise ValueError(
                f"a gate takes exactly one rule of {', '.join(GATE_RULES)} (found: {found}); write one gate per rule"
            )
        return self

    @property
    def rule(self) -> str:
        return next(r for r in GATE_RULES if getattr(self, r) is not None)

    @property
    def threshold(self) -> float:
        return float(getattr(self, self.rule))


def evaluate_gate(
    gate: Gate, candidate: float | None, baseline: float | None, higher_is_better: bool, tolerance: float = 0.0
) -> GateResult:
    """One verdict: the rule applied to the candidate's value (and the baseline's, for relative rules).
    `tolerance` (a timed metric's spread, in its unit) is a difference the rule does not count."""
    rule, threshold = gate.rule, gate.threshold
    relative = tolerance / abs(baseline) if tolerance and baseline else 0.0
    missing = candidate is None or (isinstance(candidate, float) and math.isnan(candidate))
    # A "drop" is a loss in the metric's good direction: for lower-is-better metrics, an increase.
    drop = None
    if baseline is not None and not missing:
        drop = (baseline - candidate) if higher_is_better else (candidate - baseline)
    if missing:
        compared, passed = None, False
    elif rule == "min":
        compared, passed = candidate, candidate >= threshold - tolerance
    elif rule == "max":
        compared, passed = candidate, candidate <= threshold + tolerance
    elif rule == "max_drop":
        compared = drop
        passed = drop is not None and drop <= threshold + tolerance + 1e-12
    elif rule == "max_relative_drop":
        compared = None if drop is None or baseline == 0 else drop / abs(baseline)
        passed = compared is not None and compared <= threshold + relative + 1e-12
    elif rule == "max_ratio":
        compared = None if not baseline else candidate / baseline
        passed = compared is not None and compared <= threshold + relative
    else:  # pragma: no cover - the manifest model admits only the rules above
        raise ValueError(rule)
    return GateResult(
        metric=gate.metric,
        rule=rule,
        threshold=threshold,
        value=candidate,
        baseline=baseline,
        compared=compared,
        passed=bool(passed),
        tolerance=tolerance or None,
    )


def evaluate_gates(
    gates: list[Gate],
    candidate: dict[str, float],
    baseline: dict[str, float],
    higher_is_better: dict[str, bool],
    tolerance: dict[str, float] | None = None,
) -> tuple[list[GateResult], bool]:
    """Every gate's verdict, and whether all passed. A metric the candidate also has per output
    (`<metric>.<output>`) names the output its value comes from, the worst one, and the outputs
    whose own value fails the rule (against the baseline's value of that output). `tolerance`: by
    metric, a measured spread the rule does not count (timed metrics)."""
    results = []
    for g in gates:
        higher = higher_is_better[g.metric]
        result = evaluate_gate(g, candidate.get(g.metric), baseline.get(g.metric), higher, (tolerance or {}).get(g.metric, 0.0))
        per_output = {k[len(g.metric) + 1 :]: v for k, v in candidate.items() if k.startswith(g.metric + ".")}
        if per_output:
            ranked = sorted(per_output, key=lambda o: per_output[o] if higher else -per_output[o])
            failing = [
                o
                for o in ranked
                if not evaluate_gate(g, per_output[o], baseline.get(f"{g.metric}.{o}", baseline.get(g.metric)), higher).passed
            ]
            result = result.model_copy(update={"worst_output": ranked[0], "failing_outputs": failing})
        results.append(result)
    return results, all(r.passed for r in results)


def shortfall(results: list[GateResult]) -> float:
    """How far a candidate is from passing: the sum of each failed gate's miss relative to its
    threshold (0 when every gate passes; infinite when a failed gate could not be compared)."""
    total = 0.0
    for g in results:
        if g.passed:
            continue
        if g.compared is None:
            return float("inf")
        total += abs(g.compared - g.threshold) / max(abs(g.threshold), 1e-6)
    return total
