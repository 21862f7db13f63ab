"""Accuracy-aware search: when the chain as written may fail its gates, find one that passes.

Strategies (the manifest's ``search:`` section):

``candidates``  the chain and the listed alternatives, cheapest first (by each step's
                ``expected_cost()``); all of them, or up to the first that passes.
``auto``        the chain as written and what the plugins' *alternative* moves propose from it, side
                by side; then, from the closest of them, each *refine* move keeps one more option
                per round (worst first, ``parallel`` options at a time), keeping a change only when
                it brings the gates closer (step back otherwise), until the gates pass or the budget
                is spent. The moves come from plugins (:mod:`pipeline_stage.contract.moves`); this
                module names no step.

Trials run in worker processes (:mod:`pipeline_stage.run.workers`), up to ``parallel`` at once;
each becomes a nested MLflow run under the stage's run. Passing trials are ranked by the
objective (:mod:`pipeline_stage.run.ranking`); when none passes, the closest one becomes the
candidate, the gates fail, and nothing is promoted.
"""

from __future__ import annotations

import copy
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline_stage.contract.errors import PluginError
from pipeline_stage.contract.gates import evaluate_gates, shortfall
from pipeline_stage.contract.moves import Chain, ModelFacts, SearchMove, TrialView, chain_text
from pipeline_stage.contract.report import (
    ConversionRecord,
    GateResult,
    SearchSummary,
    StepRecord,
    TimedComparison,
    TrialRecord,
)
from pipeline_stage.host.plugin_host import PluginHost
from pipeline_stage.manifest import parse_chain_item
from pipeline_stage.reporting.markdown import per_layer_errors
from pipeline_stage.run import ranking
from pipeline_stage.run.chain import Baseline, ChainResult, ChainRunner
from pipeline_stage.run.workers import TrialWorkers, parallel_trials


@dataclass
class Trial:
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
    result: dict[str, Any] = field(default_factory=dict)
    timed: list[TimedComparison] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def steps(self) -> tuple[StepRecord, ...]:
        return tuple(StepRecord(**s) for s in self.result.get("steps", []))

    def view(self) -> TrialView:
        return TrialView(chain=copy.deepcopy(self.chain), steps=self.steps, passed=self.passed, gates=tuple(self.gates))

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
            timed=self.timed,
        )


@dataclass(frozen=True)
class SearchOutcome:
    result: ChainResult  # the chosen trial's chain, as if the stage had run it
    summary: SearchSummary
    chosen: int  # the winner, or the closest trial when none passed


def _as_written(items: list[Any]) -> Chain:
    """A manifest chain as (name, params) pairs with the params its author wrote."""
    out = []
    for item in items:
        name, params = parse_chain_item(item)
        out.append((name, copy.deepcopy(params) or {}))
    return out


class Search:
    """One search, run by the stage after its baseline (see the module docstring)."""

    def __init__(self, runner: ChainRunner, host: PluginHost, baseline: Baseline, sink, workers: TrialWorkers):
        self.runner, self.host, self.baseline, self.tracking, self.workers = runner, host, baseline, sink, workers
        self.spec = runner.m.search
        self.root = runner.workdir / "search"
        self.trials: list[Trial] = []
        self.metric_names = runner.metric_names
        self.higher = runner.higher_is_better(self.metric_names)
        self.parallel = parallel_trials(self.spec)
        self.log = runner.progress("search")
        self.started = 0.0
        self.stopped_because = "exhausted"

    # -- running trials --------------------------------------------------------------------------
    def _prepare(self) -> None:
        shared = self.root / "shared"
        shared.mkdir(parents=True, exist_ok=True)
        self.data_paths = {name: ds.save(shared / f"{name}.npz") for name, ds in sorted(self.runner.datasets.items())}
        src = self.runner.source
        self.source_path = str(src.saved_model_dir if src.saved_model_dir is not None else src.path)
        # The baseline's outputs, computed once for the search: every trial's fidelity is against them.
        self.reference_path = None
        if self.runner.evaluation_data is not None:
            self.reference_path = str(shared / "reference.npz")
            np.savez(self.reference_path, **self.runner.reference_outputs())
        # The baseline's float .tflite: each trial times its candidate beside it (alternating rounds)
        self.baseline_path = None
        if self.baseline.float_bytes is not None:
            self.baseline_path = shared / "baseline.tflite"
            self.baseline_path.write_bytes(self.baseline.float_bytes)

    def _manifest(self, chain: Chain) -> str:
        m = self.runner.m
        evaluation = m.evaluation.model_dump(mode="json")
        evaluation.update(
            metrics=self.metric_names,
            max_samples=None,
            threads=max(1, (m.evaluation.threads or os.cpu_count() or 1) // self.parallel),
        )
        seeded = []
        for name, params in chain:  # fine-tuning steps take the search's seed unless the chain sets one
            fields = self.host.steps[name].cls.Params.model_fields if name in self.host.steps else {}
            seeded.append({name: {**params, "seed": self.spec.seed} if "seed" in fields and "seed" not in params else params})
        doc = {
            "model": self.source_path,
            "data": self.data_paths,
            "chain": seeded,
            "evaluation": evaluation,
            "conversion": m.conversion.model_dump(mode="json"),
            "allow_unsafe_deserialization": m.allow_unsafe_deserialization,
            "signature": m.signature,
        }
        return yaml.safe_dump(doc, sort_keys=False)

    def _budget_left(self) -> int:
        if time.perf_counter() - self.started >= self.spec.budget.seconds:
            self.stopped_because = "budget.seconds"
            return 0
        left = self.spec.budget.trials - len(self.trials)
        if left <= 0:
            self.stopped_because = "budget.trials"
        return max(0, left)

    def run_batch(self, batch: list[tuple[str, Chain]]) -> list[Trial]:
        """Run up to the budget's worth of `batch` in parallel child processes; in order."""
        batch = batch[: self._budget_left()]
        trials = []
        for origin, chain in batch:
            trial = Trial(
                index=len(self.trials) + 1, origin=origin, chain=chain, folder=self.root / f"trial-{len(self.trials) + 1:03d}"
            )
            self.trials.append(trial)
            trials.append(trial)
        with ThreadPoolExecutor(max_workers=self.parallel) as pool:
            list(pool.map(self._run_one, trials))
        for trial in trials:  # logged in trial order, whatever order they finished in
            self._log_trial(trial)
        return trials

    def _run_one(self, trial: Trial) -> None:
        trial.folder.mkdir(parents=True, exist_ok=True)
        spec = {
            "index": trial.index,
            "manifest": self._manifest(trial.chain),
            "source": self.source_path,
            "metrics": self.metric_names,
            "reference": self.reference_path,
            "baseline": str(self.baseline_path) if self.baseline_path else None,
        }
        (trial.folder / "trial.json").write_text(json.dumps(spec))
        remaining = self.spec.budget.seconds - (time.perf_counter() - self.started)
        t = time.perf_counter()
        trial.error = self.workers.run(trial.folder, timeout=max(60.0, remaining + 60.0))
        if trial.error is not None:
            trial.status = "error"
        trial.seconds = time.perf_counter() - t
        path = trial.folder / "result.json"
        if trial.error is None:
            trial.result = json.loads(path.read_text()) if path.exists() else {"error": "the trial process died (see trial.log)"}
        if "error" in trial.result or trial.error:
            trial.status = "error"
            trial.error = trial.error or str(trial.result["error"]).splitlines()[0][:300]
            return
        trial.timed = [TimedComparison(**t) for t in trial.result.get("timed", [])]
        trial.metrics, gated, baseline, spread = ranking.timed_on_one_scale(
            trial.result["metrics"], trial.timed, self.baseline.metrics
        )
        trial.gates, passed = evaluate_gates(self.runner.m.gates, gated, baseline, self.higher, tolerance=spread)
        trial.shortfall = shortfall(trial.gates)
        trial.status = "passed" if passed else "failed"

    def _log_trial(self, trial: Trial) -> None:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in trial.metrics.items())
        verdict = trial.status.upper() if trial.status != "error" else f"ERROR: {trial.error}"
        self.log(
            f"trial {trial.index}/{self.spec.budget.trials} [{trial.origin}] {chain_text(trial.chain)}: "
            f"{shown} {verdict} ({trial.seconds:.1f} s)"
        )
        tags = {
            "pipeline_stage.trial": str(trial.index),
            "pipeline_stage.trial.origin": trial.origin,
            "pipeline_stage.trial.chain": chain_text(trial.chain),
            "pipeline_stage.trial.status": trial.status,
        }
        if trial.error:
            tags["pipeline_stage.trial.error"] = trial.error
        for g in trial.gates:
            tags[f"gate.{g.metric}.{g.rule}"] = g.verdict
        params = {"chain": chain_text(trial.chain), "origin": trial.origin}
        trial.run_id = self.tracking.child_run(
            f"trial-{trial.index:03d}",
            params=params,
            metrics={**trial.metrics, "seconds": trial.seconds},
            tags=tags,
            artifacts=[trial.folder / "artifacts", trial.folder / "trial.log"],
            failed=trial.status == "error",
        )

    def _rank(self, trials: list[Trial]) -> list[Trial]:
        return ranking.rank(trials, self.spec.objective, self.higher, self.spec.tie_tolerance)

    # -- strategies --------------------------------------------------------------------------------
    def _base_chain(self) -> Chain:
        return _as_written(self.runner.m.chain)

    def _candidates(self) -> None:
        loaded, spec = self.runner.loaded, self.spec
        chains = [("as written", loaded.steps, self._base_chain())] + [
            (f"candidate {k + 1}", steps, _as_written(spec.candidates[k])) for k, steps in enumerate(loaded.candidates)
        ]
        chains = [c for c in chains if c[1] or c[0] != "as written"]
        order = sorted(range(len(chains)), key=lambda k: (sum(step.expected_cost() for step in chains[k][1]), k))
        queue = [(chains[k][0], chains[k][2]) for k in order]
        step = self.parallel if self.spec.stop_at_first_pass else len(queue)
        for start in range(0, len(queue), step):
            done = self.run_batch(queue[start : start + step])
            if self.spec.stop_at_first_pass and any(t.passed for t in done):
                self.stopped_because = "passed"
                return
            if not self._budget_left():
                return

    def _moves(self, kind: str) -> list[SearchMove]:
        """The manifest's moves of one kind, cheapest first, then in registration order."""
        names = self.runner.loaded.moves
        picked = [self.host.moves[n].cls for n in names if self.host.moves[n].cls.kind == kind]
        return [cls() for _, cls in sorted(enumerate(picked), key=lambda ic: (ic[1].cost, ic[0]))]

    def _auto(self) -> None:
        base = self._base_chain()
        alternatives, refiners = self._moves("alternative"), self._moves("refine")
        model = self.runner.source.keras_model
        facts = ModelFacts(
            layer_classes=frozenset(type(layer).__name__ for layer in model.layers) if model is not None else frozenset(),
            source_kind=self.runner.source.kind,
        )

        def instrumented(chain: Chain) -> Chain:
            for move in refiners:
                if move.applies(chain):
                    chain = move.instrument(chain)
            return chain

        # Alternatives come in tiers of cost: the cheapest beside the chain as written; a costlier
        # tier (another quantization mode, say) only when nothing cheaper, refined, passed.
        tiers = sorted({move.cost for move in alternatives})

        def proposals(cost: float) -> list[tuple[str, Chain]]:
            return [p for m in alternatives if m.cost == cost and m.applies(base) for p in m.propose(copy.deepcopy(base), facts)]

        first = [("as written", base)] + (proposals(tiers[0]) if tiers else [])
        done = self.run_batch([(origin, instrumented(chain)) for origin, chain in first])
        if any(t.passed for t in done):
            self.stopped_because = "passed"
            return
        if self._refine(done, refiners):
            return
        for cost in tiers[1:]:
            if not self._budget_left():
                return
            if any(t.passed for t in self.run_batch(proposals(cost))):
                self.stopped_because = "passed"
                return

    def _refine(self, done: list[Trial], refiners: list[SearchMove]) -> bool:
        """The refine moves, from the closest trial of `done` they apply to (its measurements rank
        every move's options); True when the search should stop (passed, or the budget is spent)."""
        start = ranking.closest([t for t in done if any(move.applies(t.chain) for move in refiners)])
        if start is None:
            return False
        current = start
        options = {move.name: move.options(start.view()) for move in refiners}
        for move in refiners:
            if not move.applies(current.chain):
                continue
            current = self._greedy(current, move, options[move.name])
            if current.passed or not self._budget_left():
                self.stopped_because = "passed" if current.passed else self.stopped_because
                return True
        return False

    def _greedy(self, current: Trial, move: SearchMove, options: list[str]) -> Trial:
        """Keep one more option per round: try the next `parallel` worst ones side by side; keep the
        one that brings the gates closest if it helps, else step back and try the next."""
        kept = move.chosen(current.chain)
        remaining = [o for o in options if o not in kept]
        limit = move.limit(self.spec, options)
        while remaining and len(kept) < limit and self._budget_left():
            batch_options, remaining = remaining[: self.parallel], remaining[self.parallel :]
            done = self.run_batch([(f"{move.label}: {o}", move.apply(current.chain, kept + [o])) for o in batch_options])
            if any(t.passed for t in done):
                return self._rank([t for t in done if t.passed])[0]
            best = ranking.closest(done)
            if best is not None and best.shortfall < current.shortfall - 1e-9:
                current = best
                kept = move.chosen(best.chain)
            # otherwise: none of these helped; step back to `current` and try the next ones
        return current

    # -- the whole search ----------------------------------------------------------------------------
    def run(self) -> SearchOutcome:
        self.started = time.perf_counter()
        self._prepare()
        self.log(
            f"strategy {self.spec.strategy}, up to {self.spec.budget.trials} trials / {self.spec.budget.seconds:g} s, "
            f"{self.parallel} at a time"
        )
        if self.spec.strategy == "candidates":
            self._candidates()
        else:
            self._auto()
        passing = self._rank([t for t in self.trials if t.passed])
        winner = passing[0] if passing else ranking.closest(self.trials)
        if winner is None:
            errors = "; ".join(f"trial {t.index}: {t.error}" for t in self.trials)
            raise PluginError(f"no search trial produced a model ({errors})")
        why = self._why(winner, passing)
        self.log(why)
        summary = SearchSummary(
            strategy=self.spec.strategy,
            objective=self.spec.objective,
            parallel=self.parallel,
            budget=self.spec.budget.model_dump(),
            stopped_because=self.stopped_because,
            seconds=round(time.perf_counter() - self.started, 3),
            winner=winner.index if passing else None,
            closest=None if passing else winner.index,
            why=why,
            chain=chain_text(winner.chain),
            trials=[t.record() for t in self.trials],
            as_written_per_layer=per_layer_errors(list(self.trials[0].steps))[:20] if self.trials else [],
        )
        artifacts = winner.folder / "artifacts" / "steps"
        if artifacts.exists():
            for path in sorted(artifacts.rglob("*")):
                if path.is_file():
                    self.tracking.log_artifact(path, str(Path("steps") / path.parent.relative_to(artifacts)))
        conversion = winner.result.get("conversion")
        result = ChainResult(
            (winner.folder / "model.tflite").read_bytes(),
            list(winner.steps),
            ConversionRecord(**conversion) if conversion else None,
            winner.result.get("tags", {}),
        )
        return SearchOutcome(result, summary, winner.index)

    def _why(self, winner: Trial, passing: list[Trial]) -> str:
        if not passing:
            return (
                f"no trial passes every gate; trial {winner.index} is the closest (shortfall {winner.shortfall:.3g}); "
                "it is reported, not promoted"
            )
        why = (
            f"trial {winner.index} passes every gate and ranks first of {len(passing)} passing by "
            f"{', '.join(self.spec.objective)}"
        )
        if len(passing) > 1:
            runner_up = passing[1]
            why += (
                f" (next: trial {runner_up.index}, "
                + ", ".join(
                    f"{n} {runner_up.metrics.get(n, float('nan')):.4g} vs {winner.metrics.get(n, float('nan')):.4g}"
                    for n in self.spec.objective
                )
                + ")"
            )
        return why
