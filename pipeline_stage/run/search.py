"""Accuracy-aware search: when the chain as written may fail its gates, find one that passes.

The strategies (the manifest's ``search:`` section) live in :mod:`pipeline_stage.run.strategies`;
this module runs the trials they ask for. Trials run in worker processes
(:mod:`pipeline_stage.run.workers`), up to ``parallel`` at once, each asked for with a
:class:`~pipeline_stage.run.trial_protocol.TrialRequest`; each becomes a nested MLflow run under
the stage's run. Passing trials are ranked by the objective (:mod:`pipeline_stage.run.ranking`);
when none passes, the closest one becomes the candidate, the gates fail, and nothing is promoted.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from pipeline_stage.contract.errors import InputError, StageError
from pipeline_stage.contract.gates import evaluate_gates, shortfall
from pipeline_stage.contract.moves import Chain, ModelFacts, chain_text
from pipeline_stage.contract.report import SearchSummary, per_layer_errors
from pipeline_stage.engine.litert_runtime import op_registerers_in_use
from pipeline_stage.manifest import LoadedManifest
from pipeline_stage.run import ranking
from pipeline_stage.run.chain import Baseline, ChainResult, ChainRunner
from pipeline_stage.run.data_spool import save_outputs
from pipeline_stage.run.strategies import STRATEGIES
from pipeline_stage.run.trial_protocol import MODEL, REQUEST, RESULT, Trial, TrialRequest, TrialResult
from pipeline_stage.run.workers import TrialWorkers, parallel_trials


@dataclass(frozen=True)
class SearchOutcome:
    result: ChainResult  # the chosen trial's chain, as if the stage had run it
    summary: SearchSummary
    chosen: int  # the winner, or the closest trial when none passed
    source_notes: list[str]  # how the chosen trial's process read the source (what it rewrote for its engine)


class Search:
    """One search, run by the stage after its baseline (see the module docstring); the
    :class:`~pipeline_stage.run.strategies.TrialBatches` its strategy drives."""

    def __init__(
        self,
        loaded: LoadedManifest,
        runner: ChainRunner,
        baseline: Baseline,
        metric_names: list[str],
        sink,
        workers: TrialWorkers,
    ):
        self.loaded, self.runner, self.host, self.baseline = loaded, runner, runner.host, baseline
        self.tracking, self.workers = sink, workers
        self.spec = loaded.manifest.search
        self.root = runner.workdir / "search"
        self.trials: list[Trial] = []
        self.metric_names = metric_names
        self.higher = runner.higher_is_better(metric_names)
        self.parallel = parallel_trials(self.spec)
        self.log = runner.progress("search")
        self.started = 0.0
        self.stopped_because = "exhausted"
        self.not_tried: list[dict[str, str]] = []
        self.paths: list[dict] = []
        self.facts = ModelFacts(layer_classes=runner.source.layer_classes(), source_kind=runner.source.name)

    # -- running trials --------------------------------------------------------------------------
    def _prepare(self) -> None:
        """What every trial shares: the source model and data where the stage has them, and the
        baseline's outputs and float .tflite, written once."""
        shared = self.root / "shared"
        shared.mkdir(parents=True, exist_ok=True)
        src, ev = self.runner.source, self.runner.evaluation
        self.source_path = str(src.path)
        # The baseline's outputs, computed once for the search: every trial's fidelity is against them.
        self.reference_path = None
        if ev.evaluation is not None:
            self.reference_path = save_outputs(ev.reference_outputs(), shared / "reference")
        # The baseline's float .tflite: each trial times its candidate beside it (alternating rounds)
        self.baseline_path = shared / "baseline.tflite"
        self.baseline_path.write_bytes(self.baseline.float_bytes)

    def _request(self, trial: Trial) -> TrialRequest:
        m, ev = self.loaded.manifest, self.runner.evaluation
        seeded = []
        for name, params in trial.chain:  # fine-tuning steps take the search's seed unless the chain sets one
            fields = self.host.steps[name].cls.Params.model_fields if name in self.host.steps else {}
            seeded.append((name, {**params, "seed": self.spec.seed} if "seed" in fields and "seed" not in params else params))
        threads = max(1, (m.evaluation.threads or os.cpu_count() or 1) // self.parallel)
        return TrialRequest(
            index=trial.index,
            chain=seeded,
            source=self.source_path,
            source_kind=self.runner.source.name,
            op_registerers=op_registerers_in_use(),
            signature=m.signature,
            allow_unsafe_deserialization=m.allow_unsafe_deserialization,
            data=ev.local_paths(),
            evaluation=m.evaluation.model_copy(update={"metrics": self.metric_names, "threads": threads}),
            conversion=m.conversion,
            metrics=self.metric_names,
            reference=self.reference_path,
            baseline=str(self.baseline_path),
        )

    def budget_left(self) -> int:
        """How many more trials the budget allows (0 once its time is spent)."""
        if time.perf_counter() - self.started >= self.spec.budget.seconds:
            self.stopped_because = "budget.seconds"
            return 0
        left = self.spec.budget.trials - len(self.trials)
        if left <= 0:
            self.stopped_because = "budget.trials"
        return max(0, left)

    def run_batch(self, batch: list[tuple[str, Chain, str]]) -> list[Trial]:
        """Run up to the budget's worth of `batch` ((origin, chain, move) proposals) in parallel
        child processes, in order; a proposal that cannot run (see :meth:`invalid`) costs no trial,
        and what is not run is noted in `not_tried` with the reason."""
        runnable = []
        for origin, chain, move in batch:
            why = self.invalid(chain)
            if why:
                self.not_tried.append({"move": move, "origin": origin, "reason": f"not a chain this model can run: {why}"})
                self.log(f"not tried [{origin}]: {why}")
            else:
                runnable.append((origin, chain, move))
        left = self.budget_left()
        for origin, _, move in runnable[left:]:
            self.not_tried.append({"move": move, "origin": origin, "reason": "the budget was spent"})
        trials = []
        for origin, chain, _ in runnable[:left]:
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

    def invalid(self, chain: Chain) -> str:
        """Why `chain` cannot run on this model, checked as the manifest's own chain is (each step's
        params, the phase order, the plugins it names, each step's `check_source`): "" when it can."""
        from pipeline_stage.manifest import parse_steps

        try:
            steps = parse_steps(
                [{name: params} for name, params in chain], self.host, path="<search proposal>", lines={}, loc=("chain",)
            )
            for step in steps:
                step.check_source(self.facts.source_kind)
        except StageError as exc:
            return exc.message.removeprefix("<search proposal>: ")
        return ""

    def _run_one(self, trial: Trial) -> None:
        trial.folder.mkdir(parents=True, exist_ok=True)
        (trial.folder / REQUEST).write_text(self._request(trial).model_dump_json())
        remaining = self.spec.budget.seconds - (time.perf_counter() - self.started)
        t = time.perf_counter()
        trial.error = self.workers.run(trial.folder, timeout=max(60.0, remaining + 60.0))
        trial.seconds = time.perf_counter() - t
        if trial.error is None:
            trial.result = _read_result(trial.folder / RESULT)
            if trial.result.error is not None:
                trial.error = (trial.result.error.strip().splitlines() or [trial.result.kind or "error"])[0][:300]
        if trial.error is not None:
            trial.status = "error"
            return
        trial.metrics, gated, baseline, spread = ranking.timed_on_one_scale(
            trial.result.metrics, trial.result.timed, self.baseline.metrics
        )
        trial.gates, passed = evaluate_gates(self.loaded.manifest.gates, gated, baseline, self.higher, tolerance=spread)
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

    def rank(self, trials: list[Trial]) -> list[Trial]:
        """`trials` best first by the objective."""
        return ranking.rank(trials, self.spec.objective, self.higher, self.spec.tie_tolerance)

    def settles(self, trials: list[Trial]) -> bool:
        """Whether one of `trials` passes and gains on the float baseline by an objective metric (a
        pass that keeps every weight float is no reason to stop looking). Untimed metrics decide
        when the objective has any, so where the search stops does not depend on timing noise."""
        untimed = [n for n in self.spec.objective if not self.host.metric_class(n).timed]
        names, base = untimed or self.spec.objective, self.baseline.metrics
        return any(t.passed and ranking.gains(t, base, names, self.higher, self.spec.tie_tolerance) for t in trials)

    # -- the whole search ----------------------------------------------------------------------------
    def run(self) -> SearchOutcome:
        """Run the manifest's strategy; the winner (or the closest trial) as the stage's candidate."""
        self.started = time.perf_counter()
        self._prepare()
        self.log(
            f"strategy {self.spec.strategy}, up to {self.spec.budget.trials} trials / {self.spec.budget.seconds:g} s, "
            f"{self.parallel} at a time"
        )
        STRATEGIES[self.spec.strategy](self)
        passing = self.rank([t for t in self.trials if t.passed])
        winner = passing[0] if passing else ranking.closest(self.trials)
        if winner is None:
            causes = "".join(f"\n  trial {t.index} ({t.origin}): {t.error}" for t in self.trials)
            raise InputError(
                f"no search trial produced a model: every chain failed on this model{causes}",
                hint="the causes above are the model's or the recipes': change the chain or the search "
                "(`search.candidates`, `search.moves`), or give another model; retrying gives the same answer",
            )
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
            not_tried=self.not_tried,
            paths=self.paths,
            as_written_per_layer=per_layer_errors(self.trials[0].result.steps)[:20] if self.trials else [],
        )
        artifacts = winner.folder / "artifacts" / "steps"
        if artifacts.exists():
            for path in sorted(artifacts.rglob("*")):
                if path.is_file():
                    self.tracking.log_artifact(path, str(Path("steps") / path.parent.relative_to(artifacts)))
        result = winner.result.chain_result((winner.folder / MODEL).read_bytes())
        return SearchOutcome(result, summary, winner.index, winner.result.source_notes)

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


def _read_result(path: Path) -> TrialResult:
    """The trial's answer; a missing or unreadable one says the process died."""
    try:
        return TrialResult.model_validate_json(path.read_text())
    except (OSError, ValidationError):
        return TrialResult(error="the trial process died (see trial.log)", kind="crash")
