"""Search moves: how the ``auto`` search changes a chain, provided by the plugins that own the steps.

The search itself names no step. Each move is a class registered through the
``register_search_moves(register)`` hook by the plugin whose step it edits (the built-in
``quantize`` plugin registers ``engine``, ``modes``, ``keep_float_outputs``, ``keep_float_ops`` and
``keep_float_nodes``; ``fuse`` registers ``fuse``). A manifest's ``search.moves`` picks moves by ``name`` (default: all).

The contract, for both kinds:

* ``applies(chain)``: whether the move has anything to do with this chain. Checked when the
  manifest is validated (``auto`` needs at least one move that applies to the chain as written;
  otherwise each move's ``requirement`` is shown) and before the move is used on a trial's chain.
* ``digest_when_named``: set it on a move a plugin adds to an existing release, so searches that
  use every move by default keep their chain digest (the registry reuses their versions).
* ``cost``: the expected cost of one chain it proposes, in conversions (1.0 = one conversion).
  Moves of a kind are used cheapest first, then in registration order.

``kind = "alternative"``: ``propose(chain, facts)`` returns ``(origin, chain)`` pairs that the
search tries side by side in its first round, next to the chain as written.

``kind = "refine"``: after the first round, starting from the closest trial whose chain the move
applies to, the move keeps one more *option* per round (an op type, a node...):
``options(trial)`` ranks the options worst first from what the trial measured (its step records),
``chosen(chain)`` says which options a chain already has, ``apply(chain, chosen)`` returns the chain
with exactly those, and ``limit(spec, options)`` caps how many it may choose. The search tries the
next ``parallel`` options side by side and keeps one only when it brings the gates closer.
``instrument(chain)`` adds what a first-round chain needs so that ``options`` can rank (for
example an analysis step); it is applied to first-round chains the move applies to. Optionally,
``dominant(trial)`` names the options that stand out by orders of magnitude: the search tries
keeping exactly those first, in one trial. A path of refinements whose gain per trial cannot close
the gates' shortfall in the budget left is abandoned for the next tier of alternatives.

Every proposal is checked before it is queued (the chain validated as a manifest's would be, each
step's ``check_source``): one that cannot run never costs a trial, and the report says why.

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pipeline_stage.contract.plugin_class import PluginClass
from pipeline_stage.contract.report import GateResult, StepRecord, per_layer_errors

Chain = list[tuple[str, dict[str, Any]]]
"""A chain as (step name, params) pairs, params as the manifest's author wrote them."""


def chain_text(chain: Chain) -> str:
    """`fuse -> quantize(mode=int8, keep_float_ops=[MUL])`: the params as written."""
    parts = []
    for name, params in chain:
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        parts.append(f"{name}({shown})" if shown else name)
    return " -> ".join(parts) or "(empty)"


def step_params(chain: Chain, step: str) -> dict[str, Any] | None:
    """The params of the first step called `step` in `chain` (mutable), or None."""
    return next((params for name, params in chain if name == step), None)


def edited(chain: Chain, step: str, **params: Any) -> Chain:
    """A copy of `chain` with `params` set on its first step called `step`."""
    out = copy.deepcopy(chain)
    target = step_params(out, step)
    if target is None:
        raise ValueError(f"the chain has no step `{step}`")
    target.update(params)
    return out


@dataclass(frozen=True)
class ModelFacts:
    """What a move may know of the source model without loading a framework."""

    layer_classes: frozenset[str] = frozenset()  # Keras layer class names; empty for a SavedModel or .tflite
    source_kind: str = "keras"  # keras | saved_model | tflite


@dataclass(frozen=True)
class TrialView:
    """A finished trial, as a refine move sees it."""

    chain: Chain
    steps: tuple[StepRecord, ...]
    passed: bool
    gates: tuple[GateResult, ...] = ()  # its verdicts; `failing_outputs` names the outputs that failed

    @property
    def per_layer(self) -> list[dict]:
        """The per-layer quantization errors one of its steps reported (`analyze` does), worst first, or []."""
        return per_layer_errors(self.steps)


class SearchMove(PluginClass):
    """Base class for a search move; subclass it and register the subclass (see the module docstring)."""

    name: ClassVar[str] = ""
    kind: ClassVar[Literal["alternative", "refine"]] = "alternative"
    cost: ClassVar[float] = 1.0
    requirement: ClassVar[str] = ""  # what a chain needs for this move to apply, for error messages
    label: ClassVar[str] = ""  # origin of the chains it proposes, e.g. "keep node in float"
    # A move added after searches were first digested: True keeps it out of the chain digest of a
    # search that does not name it in `search.moves`, so such searches keep their digest.
    digest_when_named: ClassVar[bool] = False

    def applies(self, chain: Chain) -> bool:
        return True

    # -- alternative moves --------------------------------------------------------------------
    def propose(self, chain: Chain, facts: ModelFacts) -> list[tuple[str, Chain]]:
        return []

    # -- refine moves -------------------------------------------------------------------------
    def instrument(self, chain: Chain) -> Chain:
        return chain

    def options(self, trial: TrialView) -> list[str]:
        return []

    def chosen(self, chain: Chain) -> list[str]:
        return []

    def apply(self, chain: Chain, chosen: list[str]) -> Chain:
        return chain

    def limit(self, spec: Any, options: list[str]) -> int:
        return len(options)

    def dominant(self, trial: TrialView) -> list[str]:
        """The options `trial`'s measurements single out by orders of magnitude (one op whose error
        dwarfs every other's, say): the search keeps them all at once as its first refinement;
        [] when nothing stands out."""
        return []
