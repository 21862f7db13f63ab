"""The `quantize` plugin's search moves: what the `auto` search may change in a chain's quantize step.

Alternatives (tried side by side in the first round, or in costlier tiers): the other built-in
engine (``engine``), the LiteRT Quantizer's other recipes (``recipes``) and other modes
(``modes``). Refinements (one more option per round, from the closest trial): keep one more
output's branch (``keep_float_outputs``), op type (``keep_float_ops``) or node
(``keep_float_nodes``) in float, ranked by the failing gates and the per-layer error that
``analyze`` reports through the engine.
"""

from __future__ import annotations

from pipeline_stage import Chain, ModelFacts, SearchMove, TrialView, edited, step_params
from pipeline_stage_plugins.quantize.params import BUILT_IN_ENGINES, PYTORCH_SOURCES, TENSORFLOW_SOURCES, QuantizeParams

DOMINANCE = 100.0  # how many times the next node's error a node's must be to single it out


def _quantize(chain: Chain) -> QuantizeParams | None:
    params = step_params(chain, "quantize")
    return None if params is None else QuantizeParams.model_validate(params)


class _OnFullInt8(SearchMove):
    """A move for chains that quantize to full int8 (the one rule every quantize move shares)."""

    requirement = "`quantize: {mode: int8}` in the chain"

    def applies(self, chain: Chain) -> bool:
        q = _quantize(chain)
        return q is not None and q.mode == "int8"


class OtherEngine(_OnFullInt8):
    """Quantize with the other engine, same params: the converter <-> the LiteRT Quantizer for a
    TensorFlow source, litert-torch's PT2E <-> the LiteRT Quantizer for a PyTorch one."""

    name = "engine"
    kind = "alternative"

    def propose(self, chain: Chain, facts: ModelFacts) -> list[tuple[str, Chain]]:
        q = _quantize(chain)
        native = {**dict.fromkeys(TENSORFLOW_SOURCES, "converter"), **dict.fromkeys(PYTORCH_SOURCES, "pt2e")}.get(
            facts.source_kind
        )
        if native is None or q.litert_only() or q.engine not in BUILT_IN_ENGINES:
            return []  # only the LiteRT Quantizer can take it, or it is a third-party engine's
        if native == "pt2e" and (q.keep_float_ops or q.keep_float_nodes or q.keep_float_outputs):
            return []  # PT2E quantizes every op it can
        other = "litert" if q.engine_for(facts.source_kind) == native else native
        return [(f"engine {other}", edited(chain, "quantize", engine=other))]


def _rewritten(chain: Chain, drop: set[str], **params) -> Chain:
    """`chain` with its quantize step's params: the written ones less `drop`, plus `params`."""
    written = step_params(chain, "quantize")
    kept = {k: v for k, v in written.items() if k not in drop}
    return edited([(n, p if n != "quantize" else kept) for n, p in chain], "quantize", **params)


# what only full int8 takes (selective float, integer I/O)
_FULL_INT8_ONLY = {"keep_float_ops", "keep_float_nodes", "keep_float_outputs", "io"}


class OtherModes(_OnFullInt8):
    """Quantize with another mode (dynamic, float16, int16x8) when full int8 cannot pass."""

    name = "modes"
    kind = "alternative"
    cost = 3.0  # a fallback: tried only when cheaper moves and refining found nothing

    def propose(self, chain: Chain, facts: ModelFacts) -> list[tuple[str, Chain]]:
        out = []
        for mode in ("dynamic", "float16", "int16x8"):
            # float16 is per-tensor by nature; the engine goes back to auto, which picks one that can
            drop = _FULL_INT8_ONLY | ({"per_channel", "engine"} if mode == "float16" else set())
            if facts.source_kind not in TENSORFLOW_SOURCES:
                drop |= {"engine"}
            out.append((f"mode {mode}", _rewritten(chain, drop, mode=mode)))
        return out


# The LiteRT Quantizer's recipe families the `recipes` move tries, smallest weights last: each is
# (origin, params). Weight-only keeps float activations (what full int8 and dynamic quantize), so
# it serves models whose activations int8 cannot hold; int4 and blockwise int4 halve the weights
# again; gptq is a second algorithm for the int4 weights.
RECIPE_FAMILIES: tuple[tuple[str, dict], ...] = (
    ("weight-only int8", {"mode": "weight_only"}),
    ("weight-only int8 per tensor", {"mode": "weight_only", "per_channel": False}),
    ("weight-only int4", {"mode": "weight_only", "weight_bits": 4}),
    ("weight-only int4 gptq", {"mode": "weight_only", "weight_bits": 4, "algorithm": "gptq"}),
    ("dynamic int4 blockwise 32", {"mode": "dynamic", "weight_bits": 4, "block_size": 32}),
)


class LiteRTRecipes(_OnFullInt8):
    """Try the LiteRT Quantizer's other recipes: weight-only int8 and int4, gptq, blockwise int4.

    A tier after refining full int8 and before other modes: when no int8 chain can pass, the
    objective ranks these (size first when it says so)."""

    name = "recipes"
    kind = "alternative"
    cost = 2.0
    digest_when_named = True  # added after the chain digests were first pinned: searches written before keep theirs

    def propose(self, chain: Chain, facts: ModelFacts) -> list[tuple[str, Chain]]:
        drop = _FULL_INT8_ONLY | {"engine", "per_channel"}  # auto: these run on the LiteRT Quantizer
        return [(f"recipe {origin}", _rewritten(chain, drop, **params)) for origin, params in RECIPE_FAMILIES]


class _Selective(_OnFullInt8):
    """A refine move that keeps one more thing float in a full-int8 chain: it edits the quantize
    step's list param `param`."""

    kind = "refine"
    param = ""

    def chosen(self, chain: Chain) -> list[str]:
        return list(step_params(chain, "quantize").get(self.param, []))

    def apply(self, chain: Chain, chosen: list[str]) -> Chain:
        return edited(chain, "quantize", **{self.param: chosen})


class KeepFloatOutputs(_Selective):
    """Keep one more output's own nodes in float (keep_float_outputs), the worst failing output first.

    For models with several outputs: the outputs come from the gates a trial failed, each output
    whose own value fails the gate (`<metric>.<output>`), worst first."""

    name = "keep_float_outputs"
    param = "keep_float_outputs"
    label = "keep output's nodes in float"

    def options(self, trial: TrialView) -> list[str]:
        ranked: list[str] = []
        for gate in trial.gates:
            ranked += [o for o in gate.failing_outputs if o not in ranked]
        return ranked


class _KeepFloat(_Selective):
    """Shared by the two per-layer moves: they refine a full-int8 chain on either engine, ranked by
    the per-layer quantization error that `analyze` measures in the first round (TensorFlow's
    QuantizationDebugger for the converter, the LiteRT Quantizer's comparison for litert)."""

    def instrument(self, chain: Chain) -> Chain:
        if all(name != "analyze" for name, _ in chain):
            return [*chain, ("analyze", {"top": 1000})]
        return chain


class KeepFloatOps(_KeepFloat):
    """Keep one more op type in float (keep_float_ops), worst quantization error first."""

    name = "keep_float_ops"
    param = "keep_float_ops"
    label = "keep op type in float"

    def options(self, trial: TrialView) -> list[str]:
        worst: dict[str, float] = {}
        for row in trial.per_layer:
            worst[row["op"]] = max(worst.get(row["op"], 0.0), row["rmse/scale"])
        return [op for op, _ in sorted(worst.items(), key=lambda kv: (-kv[1], kv[0]))]


class KeepFloatNodes(_KeepFloat):
    """Keep one more node in float (keep_float_nodes), worst quantization error first.

    At most `search.max_float_nodes` nodes."""

    name = "keep_float_nodes"
    param = "keep_float_nodes"
    label = "keep node in float"

    def options(self, trial: TrialView) -> list[str]:
        return [row["tensor"] for row in trial.per_layer]

    def limit(self, spec, options: list[str]) -> int:
        return spec.max_float_nodes

    def dominant(self, trial: TrialView) -> list[str]:
        """The nodes whose error is orders of magnitude above every other's (at most three), with
        the nodes that feed them (an op whose int8 input already lost what it needs, LOG after a
        tiny offset say, is only helped by keeping its producer float too)."""
        # among the nodes that add any error at all (most ops of a float-compute path add none)
        rows = sorted((r for r in trial.per_layer if (r.get("rmse/scale") or 0) > 0), key=lambda r: -float(r["rmse/scale"]))
        errors = [float(r["rmse/scale"]) for r in rows]
        for k in range(1, min(4, len(errors))):
            if errors[k - 1] >= DOMINANCE * errors[k]:
                picked = [r["tensor"] for r in rows[:k]]
                feeding = [t for r in rows[:k] for t in r.get("inputs", []) if t not in picked]
                nodes = {r["tensor"] for r in trial.per_layer}
                return picked + [t for t in dict.fromkeys(feeding) if t in nodes]
        return []
