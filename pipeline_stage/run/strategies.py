"""The search's strategies: which chains to try, in what order, from what the trials measured.

``candidates``  the chain and the listed alternatives, cheapest first (by each step's
                ``expected_cost()``); all of them, or up to the first that passes.
``auto``        the chain as written and what the plugins' *alternative* moves propose from it, side
                by side; then, from the closest of them, the options a move singles out by orders of
                magnitude (``dominant``) all at once, then each *refine* move keeps one more option
                per round (worst first, ``parallel`` options at a time), keeping a change only when
                it brings the gates closer (step back otherwise), until the gates pass, the budget
                is spent, or the path's gain per trial cannot close the shortfall in the budget left
                (then it is abandoned); then costlier alternatives. A pass settles the search only
                when it gains on the float baseline by an objective metric (smaller; faster when the
                objective has only timed metrics). The moves come from plugins
                (:mod:`pipeline_stage.contract.moves`); this module names no step.

A strategy runs trials through :class:`TrialBatches` (the search, :mod:`pipeline_stage.run.search`)
and says why it stopped in ``batches.stopped_because``.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Protocol

from pipeline_stage.contract.moves import Chain, ModelFacts, SearchMove
from pipeline_stage.contract.steps import Step
from pipeline_stage.host.plugin_host import PluginHost
from pipeline_stage.manifest import LoadedManifest, SearchSpec, parse_chain_item
from pipeline_stage.run import ranking
from pipeline_stage.run.trial_protocol import Trial


class TrialBatches(Protocol):
    """What a strategy needs of the search: the manifest, the moves' plugins, and trials run in batches."""

    loaded: LoadedManifest
    host: PluginHost
    spec: SearchSpec
    parallel: int
    facts: ModelFacts
    stopped_because: str
    not_tried: list[dict[str, str]]  # proposals never run: {move, origin, reason}

    paths: list[dict[str, Any]]  # refinement paths followed: {move, from_trial, trials, gain_per_trial, stopped_because}

    def run_batch(self, batch: list[tuple[str, Chain, str]]) -> list[Trial]: ...

    def budget_left(self) -> int: ...

    def rank(self, trials: list[Trial]) -> list[Trial]: ...

    def settles(self, trials: list[Trial]) -> bool: ...


def as_written(items: list[Any]) -> Chain:
    """A manifest chain as (name, params) pairs with the params its author wrote."""
    out = []
    for item in items:
        name, params = parse_chain_item(item)
        out.append((name, copy.deepcopy(params) or {}))
    return out


def run_candidates(search: TrialBatches) -> None:
    """The chain as written and the listed candidates, cheapest first (see the module docstring)."""
    loaded, spec = search.loaded, search.spec
    chains: list[tuple[str, list[Step], Chain]] = [("as written", loaded.steps, as_written(loaded.manifest.chain))] + [
        (f"candidate {k + 1}", steps, as_written(spec.candidates[k])) for k, steps in enumerate(loaded.candidates)
    ]
    chains = [c for c in chains if c[1] or c[0] != "as written"]
    order = sorted(range(len(chains)), key=lambda k: (sum(step.expected_cost() for step in chains[k][1]), k))
    queue = [(chains[k][0], chains[k][2], "") for k in order]
    step = search.parallel if spec.stop_at_first_pass else len(queue)
    for start in range(0, len(queue), step):
        done = search.run_batch(queue[start : start + step])
        if spec.stop_at_first_pass and any(t.passed for t in done):
            search.stopped_because = "passed"
            return
        if not search.budget_left():
            return


def _moves(search: TrialBatches, kind: str) -> list[SearchMove]:
    """The manifest's moves of one kind, cheapest first, then in registration order."""
    picked = [search.host.moves[n].cls for n in search.loaded.moves if search.host.moves[n].cls.kind == kind]
    return [cls() for _, cls in sorted(enumerate(picked), key=lambda ic: (ic[1].cost, ic[0]))]


def run_auto(search: TrialBatches) -> None:
    """Alternatives beside the chain as written, refined, then costlier alternatives (see the module docstring)."""
    base = as_written(search.loaded.manifest.chain)
    alternatives, refiners = _moves(search, "alternative"), _moves(search, "refine")

    def instrumented(chain: Chain) -> Chain:
        for move in refiners:
            if move.applies(chain):
                chain = move.instrument(chain)
        return chain

    # Alternatives come in tiers of cost: the cheapest beside the chain as written; a costlier
    # tier (another quantization mode, say) only when nothing cheaper, refined, passed.
    tiers = sorted({move.cost for move in alternatives})

    def proposals(cost: float) -> list[tuple[str, Chain, str]]:
        """The tier's (origin, chain, move) proposals; what proposes nothing is noted as not tried."""
        out = []
        for move in (m for m in alternatives if m.cost == cost):
            if not move.applies(base):
                search.not_tried.append({"move": move.name, "origin": "", "reason": f"needs {move.requirement}"})
                continue
            proposed = move.propose(copy.deepcopy(base), search.facts)
            if not proposed:
                search.not_tried.append({"move": move.name, "origin": "", "reason": "proposes nothing for this source"})
            out += [(origin, chain, move.name) for origin, chain in proposed]
        return out

    def run(batch: list[tuple[str, Chain, str]]) -> list[Trial]:
        return search.run_batch(batch)

    first = [("as written", base, "")] + (proposals(tiers[0]) if tiers else [])
    done = run([(origin, instrumented(chain), move) for origin, chain, move in first])
    if search.settles(done):
        search.stopped_because = "passed"
        _skipped(search, [p for cost in tiers[1:] for p in proposals(cost)], "an earlier trial passed")
        return
    if _refine(search, done, refiners):
        reason = "an earlier trial passed" if search.stopped_because == "passed" else "the budget was spent"
        _skipped(search, [p for cost in tiers[1:] for p in proposals(cost)], reason)
        return
    for k, cost in enumerate(tiers[1:], start=1):
        if not search.budget_left():
            _skipped(search, [p for c in tiers[k:] for p in proposals(c)], "the budget was spent")
            return
        if search.settles(run(proposals(cost))):
            search.stopped_because = "passed"
            _skipped(search, [p for c in tiers[k + 1 :] for p in proposals(c)], "an earlier trial passed")
            return


def _skipped(search: TrialBatches, batch: list[tuple[str, Chain, str]], reason: str) -> None:
    search.not_tried.extend({"move": move, "origin": origin, "reason": reason} for origin, _, move in batch)


def _refine(search: TrialBatches, done: list[Trial], refiners: list[SearchMove]) -> bool:
    """The refine moves, from the closest trial of `done` they apply to (its measurements rank
    every move's options; what they single out comes first); True when the search should stop
    (passed, or the budget is spent)."""
    start = ranking.closest([t for t in done if any(move.applies(t.chain) for move in refiners)])
    if start is None:
        return False
    view = start.view()
    options = {move.name: move.options(view) for move in refiners}
    current = _dominant_first(search, start, refiners, view)
    for move in refiners:
        if search.settles([current]):
            search.stopped_because = "passed"
            return True
        if current.passed:
            return False  # it passes but gains nothing on float: the costlier tiers may
        if not search.budget_left():
            return True
        if not move.applies(current.chain):
            continue
        current, out_of_reach = _greedy(search, current, move, options[move.name])
        if out_of_reach:
            break  # the refinements creep: the budget goes to the next tier
    if search.settles([current]):
        search.stopped_because = "passed"
        return True
    return not current.passed and not search.budget_left()


def _dominant_first(search: TrialBatches, current: Trial, refiners: list[SearchMove], view) -> Trial:
    """One trial keeping every option the first move that singles some out (``dominant``) names,
    all at once: the obvious first refinement when one op's error dwarfs the rest. Kept when it
    brings the gates closer."""
    for move in refiners:
        chosen = move.chosen(current.chain) if move.applies(current.chain) else None
        new = [o for o in move.dominant(view) if chosen is not None and o not in chosen]
        if not new or not search.budget_left():
            continue
        origin = f"{move.label}, the dominant error first: {', '.join(new)}"
        done = search.run_batch([(origin, move.apply(current.chain, chosen + new), move.name)])
        best = done[0] if done else None
        helped = best is not None and (best.passed or best.shortfall < current.shortfall - 1e-9)
        search.paths.append(_path(move, current, best, len(done), "kept" if helped else "did not bring the gates closer"))
        return best if helped else current
    return current


def _path(move: SearchMove, start: Trial, end: Trial | None, trials: int, stopped_because: str) -> dict[str, Any]:
    """A refinement path as the report shows it."""
    gain = None
    if end is not None and trials and math.isfinite(start.shortfall) and math.isfinite(end.shortfall):
        gain = round((start.shortfall - end.shortfall) / trials, 6)
    return {
        "move": move.name,
        "from_trial": start.index,
        "to_trial": end.index if end is not None else None,
        "trials": trials,
        "gain_per_trial": gain,
        "shortfall": None if end is None or not math.isfinite(end.shortfall) else round(end.shortfall, 6),
        "stopped_because": stopped_because,
    }


def _greedy(search: TrialBatches, current: Trial, move: SearchMove, options: list[str]) -> tuple[Trial, bool]:
    """Keep one more option per round: try the next `parallel` worst ones side by side; keep the
    one that brings the gates closest if it helps, else step back and try the next. Abandoned once
    its gain per trial, kept up over the budget left, cannot close the shortfall (after two
    trials: one option that does not help is not yet a trend). Returns the closest trial, and
    whether the path was abandoned as out of reach."""
    start, trials, why, out_of_reach = current, 0, "no option left", False
    kept = move.chosen(current.chain)
    remaining = [o for o in options if o not in kept]
    limit = move.limit(search.spec, options)
    while remaining and len(kept) < limit:
        if not search.budget_left():
            why = "the budget was spent"
            break
        batch_options, remaining = remaining[: search.parallel], remaining[search.parallel :]
        done = search.run_batch([(f"{move.label}: {o}", move.apply(current.chain, kept + [o]), move.name) for o in batch_options])
        trials += len(done)
        if any(t.passed for t in done):
            best = search.rank([t for t in done if t.passed])[0]
            search.paths.append(_path(move, start, best, trials, "passed"))
            return best, False
        best = ranking.closest(done)
        if best is not None and best.shortfall < current.shortfall - 1e-9:
            current = best
            kept = move.chosen(best.chain)
        # otherwise: none of these helped; step back to `current` and try the next ones
        reach = _out_of_reach(start, current, trials, search.budget_left())
        if reach:
            why, out_of_reach = reach, True
            break
    else:
        why = "every option it ranks was tried" if not remaining else f"its limit of {limit} options"
    search.paths.append(_path(move, start, current, trials, why))
    return current, out_of_reach


def _out_of_reach(start: Trial, current: Trial, trials: int, left: int) -> str:
    """Why this path cannot reach the gates in the trials `left` at its gain per trial so far ("":
    it may). Shortfalls that could not be compared are not extrapolated."""
    if trials < 2 or not (math.isfinite(start.shortfall) and math.isfinite(current.shortfall)):
        return ""
    gain = (start.shortfall - current.shortfall) / trials
    if gain * left >= current.shortfall:
        return ""
    return (
        f"at {gain:.3g} of shortfall per trial over {trials} trials, the {left} trial(s) left cannot close "
        f"the shortfall of {current.shortfall:.3g}: the budget goes to the next tier"
    )


STRATEGIES = {"candidates": run_candidates, "auto": run_auto}
