"""The search's trial protocol: what the stage asks of a trial and what the trial answers.

A trial folder holds ``request.json`` (a :class:`TrialRequest`, written by the search) and, once the
trial has run, ``result.json`` (a :class:`TrialResult`, written by :mod:`pipeline_stage.run.trial`)
and ``model.tflite``. Each side validates the other's file once, with these models; the request
names the data its parent loaded by path (no copy) and the parent's reference outputs and float
baseline by file. :class:`Trial` is the search's record of one trial: its request's chain, its
verdict, its result.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline_stage.contract.moves import Chain, TrialView, chain_text
from pipeline_stage.contract.report import ConversionRecord, GateResult, StepRecord, TimedComparison, TrialRecord
from pipeline_stage.manifest.schema import ConversionSpec, EvaluationSpec
from pipeline_stage.run.chain import ChainResult

REQUEST, RESULT, MODEL = "request.json", "result.json", "model.tflite"


class TrialRequest(BaseModel):
    """One trial: a chain to run on the parent's source model and data, measured as the stage measures."""

    model_config = ConfigDict(extra="forbid")

    index: int = Field(description="The trial's number in the search (1-based).")
    chain: list[tuple[str, dict[str, Any]]] = Field(description="(step name, params) pairs, as the author or a move wrote them.")
    source: str = Field(description="The source model on local disk (the parent's download).")
    source_kind: str | None = Field(
        None, description="The source plugin that opened it in the parent (None: recognise it again)."
    )
    op_registerers: list[str] = Field(default_factory=list, description="Custom op kernels its interpreters load (the stage's).")
    signature: str = "serving_default"
    allow_unsafe_deserialization: bool = False
    data: dict[str, str] = Field(description="Each data set the parent loaded, by its local path.")
    evaluation: EvaluationSpec
    conversion: ConversionSpec
    metrics: list[str] = Field(description="What to measure on the trial's model (the stage's metrics).")
    reference: str | None = Field(
        None, description="The source model's outputs on the evaluation data: a folder data_spool.load_outputs reads."
    )
    baseline: str | None = Field(None, description="The float baseline .tflite the trial times its model beside.")


class TrialResult(BaseModel):
    """What a trial measured and made; or the error that stopped it."""

    model_config = ConfigDict(extra="forbid")

    metrics: dict[str, float] = Field(default_factory=dict)
    timed: list[TimedComparison] = Field(default_factory=list)
    steps: list[StepRecord] = Field(default_factory=list)
    conversion: ConversionRecord | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    evaluation_notes: list[str] = Field(default_factory=list, description="What its evaluation had to do otherwise.")
    source_notes: list[str] = Field(default_factory=list, description="How its source was read (the source plugin's notes).")
    error: str | None = Field(None, description="Why the trial produced no model (its first line is reported).")
    kind: str | None = Field(None, description="The error's class, or `crash` for an unexpected exception.")
    seconds: float = 0.0

    def chain_result(self, model_bytes: bytes) -> ChainResult:
        """The trial's chain, as if the stage had run it."""
        return ChainResult(model_bytes, list(self.steps), self.conversion, dict(self.tags))


@dataclass
class Trial:
    """The search's record of one trial (see the module docstring)."""

    index: int
    origin: str  # why this chain was tried
    chain: Chain
    folder: Path
    status: str = "pending"  # passed | failed | error
    metrics: dict[str, float] = field(default_factory=dict)
    gates: list[GateResult] = field(default_factory=list)
    shortfall: float = float("inf")
    seconds: float = 0.0
    error: str | None = None
    run_id: str | None = None
    result: TrialResult = field(default_factory=TrialResult)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def view(self) -> TrialView:
        return TrialView(
            chain=copy.deepcopy(self.chain), steps=tuple(self.result.steps), passed=self.passed, gates=tuple(self.gates)
        )

    def record(self) -> TrialRecord:
        return TrialRecord(
            index=self.index,
            origin=self.origin,
            chain=chain_text(self.chain),
            status=self.status,
            metrics=self.metrics,
            shortfall=None if self.shortfall == float("inf") else round(self.shortfall, 6),
            failed_gates=[g.label for g in self.gates if not g.passed],
            seconds=round(self.seconds, 3),
            error=self.error,
            run_id=self.run_id,
            timed=self.result.timed,
            evaluation_notes=self.result.evaluation_notes,
        )
