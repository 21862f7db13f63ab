"""Accuracy-aware search: when the chain as written may fail its gates, find one that passes.

Strategies (the manifest's ``search:`` section):

``candidates``  the chain and the listed alternatives, cheapest first (by each step's
                ``expected_cost()``); all of them, or up to the first that passes.
``auto``        around full-int8 quantization: first the chain as written, ``fuse`` in front of it
                (when the model has BatchNorm) and the other quantization engine, side by side;
                then, from the closest of them, keep op types and then single nodes in float, worst
                quantization error first (the ``analyze`` step's per-layer statistics), one batch
                of alternatives at a time, keeping a revert only when it brings the gates closer
                (step back otherwise), until the gates pass or the budget is spent.

Every trial runs in its own child process (:mod:`pipeline_stage.trial`), up to ``parallel`` at
once, and becomes a nested MLflow run under the stage's run. Passing trials are ranked by the
objective (values within ``tie_tolerance`` count as equal, so a noisy timing does not decide
alone; then trial order); when none passes, the closest one (smallest relative gate shortfall)
becomes the candidate, the gates fail, and nothing is promoted.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline_stage.errors import PluginError
from pipeline_stage.report import per_layer_errors
from pipeline_stage.steps import StepRecord

if TYPE_CHECKING:
    from pipeline_stage.runner import Stage

Chain = list[tuple[str, dict[str, Any]]]


def chain_text(chain: Chain) -> str:
    """`fuse -> quantize(mode=int8, keep_float_ops=[MUL])`: the non-default params only."""
    parts = []
    for name, params in chain:
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        parts.append(f"{name}({shown})" if shown else name)
    return " -> ".join(parts) or "(empty)"


@dataclass
class Trial:
    index: int
    origin: str  # why this chain was tried
    chain: Chain
    folder: Path
    status: str = "pending"  # passed | failed | error | skipped
    metrics: dict[str, float] = field(default_factory=dict)
    gates: list[dict[str, Any]] = field(default_factory=list)
    shortfall: float = float("inf")
    seconds: float = 0.0
    error: str | None = None
    run_id: str | None = None
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "origin": self.origin, "chain": chain_text(self.chain), "status": self.status,
                "metrics": self.metrics, "shortfall": None if self.shortfall == float("inf") else round(self.shortfall, 6),
                "failed_gates": [f"{g['metric']} {g['rule']} {g['threshold']:g}" for g in self.gates if not g["passed"]],
                "seconds": round(self.seconds, 3), "error": self.error, "run_id": self.run_id}


@dataclass
class Outcome:
    model_bytes: bytes
    records: list[StepRecord]
    summary: dict[str, Any]
    conversion: dict[str, Any] | None


def _as_written(items: list[Any]) -> Chain:
    """A manifest chain as (name, params) pairs with the params its author wrote."""
    from pipeline_stage.manifest import parse_chain_item

    out = []
    for item in items:
        name, params = parse_chain_item(item)
        out.append((name, copy.deepcopy(params) or {}))
    return out


def _quantize_params(chain: Chain) -> dict[str, Any]:
    """The (mutable) params of the chain's quantize step."""
    return next(params for name, params in chain if name == "quantize")


def shortfall(gates: list[dict[str, Any]]) -> float:
    """How far a trial is from passing: the sum of each failed gate's miss relative to its threshold."""
    total = 0.0
    for g in gates:
        if g["passed"]:
            continue
        if g["compared"] is None:
            return float("inf")
        total += abs(g["compared"] - g["threshold"]) / max(abs(g["threshold"]), 1e-6)
    return total


class Search:
    """One search, run by the stage after its baseline (see the module docstring)."""

    def __init__(self, stage: "Stage", report: dict[str, Any], run):
        self.stage, self.report, self.tracking = stage, report, run
        self.spec = stage.m.search
        self.root = stage.workdir / "search"
        self.trials: list[Trial] = []
        self.metric_names = stage.loaded.metric_names()
        self.higher = stage.higher_is_better(self.metric_names)
        self.parallel = self.spec.parallel or os.cpu_count() or 1
        self.log = stage._progress("search")
        self.started = 0.0
        self.stopped_because = "exhausted"

    # -- running trials --------------------------------------------------------------------------
    def _prepare(self) -> None:
        stage = self.stage
        shared = self.root / "shared"
        shared.mkdir(parents=True, exist_ok=True)
        self.data_paths = {}
        for name, dataset in sorted(stage._data.items()):
            path = shared / f"{name}.npz"
            self.data_paths[name] = dataset.save(path)
        src = stage.source
        self.source_path = str(src.saved_model_dir if src.saved_model_dir is not None else src.path)

    def _manifest(self, chain: Chain) -> str:
        m = self.stage.m
        evaluation = m.evaluation.model_dump(mode="json")
        evaluation.update(metrics=self.metric_names, max_samples=None,
                          threads=max(1, (m.evaluation.threads or os.cpu_count() or 1) // self.parallel))
        steps = self.stage.registry.steps
        seeded = []
        for name, params in chain:  # fine-tuning steps take the search's seed unless the chain sets one
            fields = steps[name].cls.Params.model_fields if name in steps else {}
            seeded.append({name: {**params, "seed": self.spec.seed} if "seed" in fields and "seed" not in params else params})
        doc = {"model": self.source_path, "data": self.data_paths, "chain": seeded,
               "evaluation": evaluation, "conversion": m.conversion.model_dump(mode="json"),
               "allow_unsafe_deserialization": m.allow_unsafe_deserialization}
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
            trial = Trial(index=len(self.trials) + 1, origin=origin, chain=chain, folder=self.root / f"trial-{len(self.trials) + 1:03d}")
            self.trials.append(trial)
            trials.append(trial)
        with ThreadPoolExecutor(max_workers=self.parallel) as pool:
            list(pool.map(self._run_one, trials))
        for trial in trials:  # logged in trial order, whatever order they finished in
            self._log_trial(trial)
        return trials

    def _run_one(self, trial: Trial) -> None:
        trial.folder.mkdir(parents=True, exist_ok=True)
        spec = {"index": trial.index, "manifest": self._manifest(trial.chain), "source": self.source_path,
                "metrics": self.metric_names}
        (trial.folder / "trial.json").write_text(json.dumps(spec))
        remaining = self.spec.budget.seconds - (time.perf_counter() - self.started)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONHASHSEED": str(self.spec.seed)}
        t = time.perf_counter()
        with open(trial.folder / "trial.log", "w") as log:
            try:
                subprocess.run([sys.executable, "-m", "pipeline_stage.trial", str(trial.folder)], stdout=log, stderr=log,
                               env=env, timeout=max(60.0, remaining + 60.0), check=False)
            except subprocess.TimeoutExpired:
                trial.status, trial.error = "error", "ran past the search's time budget"
        trial.seconds = time.perf_counter() - t
        path = trial.folder / "result.json"
        if trial.error is None:
            trial.result = json.loads(path.read_text()) if path.exists() else {"error": "the trial process died (see trial.log)"}
        if "error" in trial.result or trial.error:
            trial.status = "error"
            trial.error = trial.error or str(trial.result["error"]).splitlines()[0][:300]
            return
        from pipeline_stage.gates import evaluate_gates

        trial.metrics = trial.result["metrics"]
        trial.gates, passed = evaluate_gates(self.stage.m.gates, trial.metrics, self.report["baseline"], self.higher)
        trial.shortfall = shortfall(trial.gates)
        trial.status = "passed" if passed else "failed"

    def _log_trial(self, trial: Trial) -> None:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in trial.metrics.items())
        verdict = trial.status.upper() if trial.status != "error" else f"ERROR: {trial.error}"
        self.log(f"trial {trial.index}/{self.spec.budget.trials} [{trial.origin}] {chain_text(trial.chain)}: "
                 f"{shown} {verdict} ({trial.seconds:.1f} s)")
        tags = {"pipeline_stage.trial": str(trial.index), "pipeline_stage.trial.origin": trial.origin,
                "pipeline_stage.trial.chain": chain_text(trial.chain), "pipeline_stage.trial.status": trial.status}
        if trial.error:
            tags["pipeline_stage.trial.error"] = trial.error
        for g in trial.gates:
            tags[f"gate.{g['metric']}.{g['rule']}"] = "pass" if g["passed"] else "fail"
        params = {"chain": chain_text(trial.chain), "origin": trial.origin}
        trial.run_id = self.tracking.child_run(f"trial-{trial.index:03d}", params=params, metrics={**trial.metrics, "seconds": trial.seconds},
                                          tags=tags, artifacts=[trial.folder / "artifacts", trial.folder / "trial.log"],
                                          failed=trial.status == "error")

    # -- ranking ---------------------------------------------------------------------------------
    def _better(self, a: Trial, b: Trial) -> int:
        """-1 if `a` ranks before `b` by the objective (with tie tolerance), then by trial order."""
        for name in self.spec.objective:
            va, vb = a.metrics.get(name), b.metrics.get(name)
            if va is None or vb is None or va == vb:
                continue
            if abs(va - vb) <= self.spec.tie_tolerance * max(abs(va), abs(vb)):
                continue
            good = (va > vb) if self.higher[name] else (va < vb)
            return -1 if good else 1
        return -1 if a.index < b.index else 1

    def _rank(self, trials: list[Trial]) -> list[Trial]:
        return sorted(trials, key=functools.cmp_to_key(self._better))

    def _closest(self, trials: list[Trial]) -> Trial | None:
        usable = [t for t in trials if t.status in ("passed", "failed")]
        return min(usable, key=lambda t: (t.shortfall, t.index)) if usable else None

    # -- strategies --------------------------------------------------------------------------------
    def _base_chain(self) -> Chain:
        return _as_written(self.stage.m.chain)

    def _candidates(self) -> None:
        loaded, spec = self.stage.loaded, self.spec
        chains = [("as written", loaded.steps, self._base_chain())] + [
            (f"candidate {k + 1}", steps, _as_written(spec.candidates[k])) for k, steps in enumerate(loaded.candidates)]
        chains = [c for c in chains if c[1] or c[0] != "as written"]
        order = sorted(range(len(chains)), key=lambda k: (sum(step.expected_cost() for step in chains[k][1]), k))
        queue = [(chains[k][0], chains[k][2]) for k in order]
        step = self.parallel if self.spec.stop_at_first_pass else len(queue)
        for start in range(0, len(queue), step):
            done = self.run_batch(queue[start:start + step])
            if self.spec.stop_at_first_pass and any(t.passed for t in done):
                self.stopped_because = "passed"
                return
            if not self._budget_left():
                return

    def _auto(self) -> None:
        base = self._base_chain()
        analyze = ("analyze", {"top": 1000})
        moves = self.spec.moves

        def edit(chain: Chain, **params) -> Chain:
            out = copy.deepcopy(chain)
            _quantize_params(out).update(params)
            return out

        with_analysis = base + [analyze] if all(name != "analyze" for name, _ in base) else base
        first = [("as written", with_analysis)]
        model = self.stage.source.keras_model
        has_bn = model is not None and any(type(layer).__name__ == "BatchNormalization" for layer in model.layers)
        if "fuse" in moves and has_bn and all(name != "fuse" for name, _ in base):
            first.append(("fold BatchNorm (fuse)", [("fuse", {})] + with_analysis))
        engine = _quantize_params(base).get("engine", "converter")
        if "engine" in moves:
            other = "litert" if engine == "converter" else "converter"
            first.append((f"engine {other}", edit(base, engine=other)))
        done = self.run_batch(first)
        if any(t.passed for t in done):
            self.stopped_because = "passed"
            return
        # Reverts to float start from the closest converter-engine trial, whose analysis ranks the nodes.
        current = self._closest([t for t in done if _quantize_params(t.chain).get("engine", "converter") == "converter"])
        if current is None:
            return
        ranking = self._ranking(current)
        for kind in ("keep_float_ops", "keep_float_nodes"):
            if kind not in moves:
                continue
            if kind == "keep_float_ops":
                worst: dict[str, float] = {}
                for row in ranking:
                    worst[row["op"]] = max(worst.get(row["op"], 0.0), row["rmse/scale"])
                options = [op for op, _ in sorted(worst.items(), key=lambda kv: (-kv[1], kv[0]))]
            else:
                options = [row["tensor"] for row in ranking]
            current = self._greedy(current, kind, options, edit)
            if current.passed or not self._budget_left():
                self.stopped_because = "passed" if current.passed else self.stopped_because
                return

    def _ranking(self, trial: Trial) -> list[dict[str, Any]]:
        return per_layer_errors(trial.result.get("steps", []))

    def _greedy(self, current: Trial, kind: str, options: list[str], edit) -> Trial:
        """Keep one more op type / node in float per round: try the next `parallel` worst ones side by
        side; keep the one that brings the gates closest if it helps, else step back and try the next."""
        kept = list(_quantize_params(current.chain).get(kind, []))
        remaining = [o for o in options if o not in kept]
        limit = self.spec.max_float_nodes if kind == "keep_float_nodes" else len(options)
        while remaining and len(kept) < limit and self._budget_left():
            batch_options, remaining = remaining[: self.parallel], remaining[self.parallel:]
            label = "keep op type in float" if kind == "keep_float_ops" else "keep node in float"
            done = self.run_batch([(f"{label}: {o}", edit(current.chain, **{kind: kept + [o]})) for o in batch_options])
            if any(t.passed for t in done):
                return self._rank([t for t in done if t.passed])[0]
            best = self._closest(done)
            if best is not None and best.shortfall < current.shortfall - 1e-9:
                current = best
                kept = list(_quantize_params(best.chain)[kind])
            # otherwise: none of these reverts helped; step back to `current` and try the next ones
        return current

    # -- the whole search ----------------------------------------------------------------------------
    def run(self) -> Outcome:
        self.started = time.perf_counter()
        self._prepare()
        self.log(f"strategy {self.spec.strategy}, up to {self.spec.budget.trials} trials / {self.spec.budget.seconds:g} s, "
                 f"{self.parallel} at a time")
        if self.spec.strategy == "candidates":
            self._candidates()
        else:
            self._auto()
        passing = self._rank([t for t in self.trials if t.passed])
        winner = passing[0] if passing else self._closest(self.trials)
        if winner is None:
            errors = "; ".join(f"trial {t.index}: {t.error}" for t in self.trials)
            raise PluginError(f"no search trial produced a model ({errors})")
        if passing:
            why = (f"trial {winner.index} passes every gate and ranks first of {len(passing)} passing by "
                   f"{', '.join(self.spec.objective)}")
            if len(passing) > 1:
                runner_up = passing[1]
                why += f" (next: trial {runner_up.index}, " + ", ".join(
                    f"{n} {runner_up.metrics.get(n, float('nan')):.4g} vs {winner.metrics.get(n, float('nan')):.4g}"
                    for n in self.spec.objective) + ")"
        else:
            why = (f"no trial passes every gate; trial {winner.index} is the closest (shortfall {winner.shortfall:.3g}); "
                   "it is reported, not promoted")
        self.log(why)
        summary = {"strategy": self.spec.strategy, "objective": self.spec.objective, "parallel": self.parallel,
                   "budget": self.spec.budget.model_dump(), "stopped_because": self.stopped_because,
                   "seconds": round(time.perf_counter() - self.started, 3), "winner": winner.index if passing else None,
                   "closest": None if passing else winner.index, "why": why, "chain": chain_text(winner.chain),
                   "trials": [t.to_dict() for t in self.trials],
                   "as_written_per_layer": self._ranking(self.trials[0])[:20] if self.trials else []}
        self.stage._step_tags.update(winner.result.get("tags", {}))
        self.stage._step_tags["pipeline_stage.search.trial"] = str(winner.index)
        artifacts = winner.folder / "artifacts" / "steps"
        if artifacts.exists():
            for path in sorted(artifacts.rglob("*")):
                if path.is_file():
                    self.tracking.log_artifact(path, str(Path("steps") / path.parent.relative_to(artifacts)))
        records = [StepRecord(s["name"], s["phase"], s["params"], s["metrics"], s["seconds"], s["notes"])
                   for s in winner.result["steps"]]
        return Outcome((winner.folder / "model.tflite").read_bytes(), records, summary, winner.result.get("conversion"))
