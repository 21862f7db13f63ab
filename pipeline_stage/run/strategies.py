"""The search's strategies: which chains to try, in what order, from what the trials measured.

``candidates``  the chain and the listed alternatives, cheapest first (by each step's
                ``expected_cost()``); all of them, or up to the first that passes.
``auto``        the chain as written and what the plugins' *alternative* moves propose from it, side
                by side; then, from the closest of them, each *refine* move keeps one more option
                per round (worst first, ``parallel`` options at a time), keeping a change only when
                it brings the gates closer (step back otherwise), until the gates pass or the budget
                is spent; then costlier alternatives. A pass settles the search only when it gains
                on the float baseline by an objective metric (smaller; faster when the objective
                has only timed metrics). The moves come from plugins
                (:mod:`pipeline_stage.contract.moves`); this module names no step.

A strategy runs trials through :class:`TrialBatches` (the search, :mod:`pipeline_stage.run.search`)
and says why it stopped in ``batches.stopped_because``.
"""

from __future__ import annotations

import copy
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

    def run_batch(self, batch: list[tuple[str, Chain]]) -> list[Trial]: ...

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
    queue = [(chains[k][0], chains[k][2]) for k in order]
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
        done = search.run_batch([(origin, chain) for origin, chain, _ in batch])
        _skipped(search, batch[len(done) :], "the budget was spent")
        return done

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
    every move's options); True when the search should stop (passed, or the budget is spent)."""
    start = ranking.closest([t for t in done if any(move.applies(t.chain) for move in refiners)])
    if start is None:
        return False
    current = start
    options = {move.name: move.options(start.view()) for move in refiners}
    for move in refiners:
        if not move.applies(current.chain):
            continue
        current = _greedy(search, current, move, options[move.name])
        if search.settles([current]) or not search.budget_left():
            search.stopped_because = "passed" if current.passed else search.stopped_because
            return True
        if current.passed:
            return False  # it passes but gains nothing on float: the costlier tiers may
    return False


def _greedy(search: TrialBatches, current: Trial, move: SearchMove, options: list[str]) -> Trial:
    """Keep one more option per round: try the next `parallel` worst ones side by side; keep the
    one that brings the gates closest if it helps, else step back and try the next."""
    kept = move.chosen(current.chain)
    remaining = [o for o in options if o not in kept]
    limit = move.limit(search.spec, options)
    while remaining and len(kept) < limit and search.budget_left():
        batch_options, remaining = remaining[: search.parallel], remaining[search.parallel :]
        done = search.run_batch([(f"{move.label}: {o}", move.apply(current.chain, kept + [o])) for o in batch_options])
        if any(t.passed for t in done):
            return search.rank([t for t in done if t.passed])[0]
        best = ranking.closest(done)
        if best is not None and best.shortfall < current.shortfall - 1e-9:
            current = best
            kept = move.chosen(best.chain)
        # otherwise: none of these helped; step back to `current` and try the next ones
    return current


STRATEGIES = {"candidates": run_candidates, "auto": run_auto}
