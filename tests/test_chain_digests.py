"""Chain digests are the registry's identity for reuse (an identical passing version is found by
its digest): a refactor must keep every one byte-identical. Pinned here for every example manifest
and for chains that reach each built-in step and the search's options."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from pipeline_stage.host.plugin_host import build_host
from pipeline_stage.manifest import load_manifest, parse_manifest

REPO = Path(__file__).resolve().parents[1]
PINNED = json.loads((Path(__file__).parent / "chain_digests.json").read_text())
MODEL = "models:/pinned@champion"
HEAD = f"model: {MODEL}\ndata: {{evaluation: e.npz, calibration: c.npz, training: t.npz}}\n"
CHAINS = {
    "every-step": HEAD
    + """chain:
  - prune: {target_sparsity: 0.5, epochs: 1, seed: 3}
  - fuse: {equalize: true}
  - quantize: {mode: int8, io: int8, per_channel: false, keep_float_nodes: [dense], calibration_samples: 50}
  - strip_ops: {drop_metadata: [min_runtime_version]}
  - delegates: {targets: [xnnpack], benchmark: false}
  - analyze: {per_layer: true, top: 5}
gates: [{metric: accuracy, max_drop: 0.02}]
""",
    "qat": HEAD + "chain: [{quantize: {mode: int8, qat_epochs: 1, seed: 1}}]\n",
    "litert": HEAD + "chain: [{quantize: {mode: dynamic, engine: litert}}]\n",
    "float16": HEAD + "chain: [quantize: {mode: float16}]\n",
    "signature": HEAD + "signature: classify\nchain: [quantize: {mode: int8}]\n",
    "search-auto": HEAD
    + """chain: [quantize: {mode: int8}]
gates: [{metric: accuracy, max_drop: 0.01}]
search: {strategy: auto, budget: {trials: 6}, parallel: 2, moves: [keep_float_nodes, modes], objective: [size_bytes]}
""",
    "search-candidates": HEAD
    + """chain: [quantize: {mode: int8}]
gates: [{metric: fidelity_sqnr_db, min: 20}]
search:
  strategy: candidates
  candidates: [[{fuse: {}}, {quantize: {mode: int8}}], [{quantize: {mode: dynamic}}]]
""",
}


@functools.cache
def digests() -> dict[str, str]:
    host = build_host(load_entry_points=False)
    out = {}
    for path in sorted((REPO / "manifests" / "examples").glob("*.yaml")):
        out[f"manifests/examples/{path.name}"] = load_manifest(path, host, model_uri=MODEL).chain_digest
    for name, text in CHAINS.items():
        out[name] = parse_manifest(text, host, path=f"<{name}>").chain_digest
    return out


@pytest.mark.parametrize("name", sorted(PINNED))
def test_chain_digest_is_pinned(name):
    assert digests()[name] == PINNED[name], f"the chain digest of {name} changed: registered versions would not be reused"


def test_every_example_is_pinned():
    assert set(digests()) == set(PINNED)


def _digest(chain: str, extra: str = "") -> str:
    return parse_manifest(HEAD + f"chain: [{chain}]\n{extra}", build_host(load_entry_points=False)).chain_digest


def test_engine_auto_and_params_added_later_keep_the_digest():
    """`engine: auto` (the default since it came) counts as the engine it picks for a TensorFlow source,
    and a param added later counts only when set off its default: chains written before keep their
    digest; what changes the recipe changes it."""
    written = _digest("quantize: {mode: int8}")
    assert _digest("quantize: {mode: int8, engine: converter}") == written
    assert _digest("quantize: {mode: int8, engine: auto, weight_bits: 8, algorithm: min_max}") == written
    assert _digest("quantize: {mode: int8, engine: litert}") != written
    assert _digest("quantize: {mode: weight_only}") == _digest("quantize: {mode: weight_only, engine: litert}")
    assert (
        len({written, _digest("quantize: {mode: int8, algorithm: mse}"), _digest("quantize: {mode: int8, weight_bits: 4}")}) == 3
    )


def test_a_move_added_later_counts_in_a_search_digest_only_when_named():
    gates = "gates: [{metric: accuracy, max_drop: 0.01}]\n"
    every = _digest("quantize: {mode: int8}", gates + "search: {strategy: auto}\n")
    before = [name for name in build_host(load_entry_points=False).moves if name != "recipes"]  # the moves of 0.1
    assert every == _digest("quantize: {mode: int8}", gates + f"search: {{strategy: auto, moves: [{', '.join(before)}]}}\n")
    named = _digest("quantize: {mode: int8}", gates + "search: {strategy: auto, moves: [recipes]}\n")
    assert named != every


if __name__ == "__main__":  # `python -m tests.test_chain_digests` prints the table to pin
    print(json.dumps(digests(), indent=1, sort_keys=True))


def test_compile_targets_count_in_the_digest():
    """A version holds its compiled models: another target, or other options, is another version."""
    host = build_host(load_entry_points=False)
    plain = parse_manifest(HEAD + "chain: [quantize: {mode: int8}]\n", host).chain_digest
    digest = {}
    for key, targets in (
        ("lnl", "[intel_openvino/LNL]"),
        ("ptl", "[intel_openvino/PTL]"),
        ("cpu", "[{target: intel_openvino/LNL, options: {graph_backend: cpu}}]"),
    ):
        digest[key] = parse_manifest(
            HEAD + f"chain: [quantize: {{mode: int8}}]\ncompile: {{targets: {targets}}}\n", host
        ).chain_digest
    assert len({plain, *digest.values()}) == 4, digest
