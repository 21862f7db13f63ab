"""Benchmark: the auto search against an exhaustive run over the same candidate space.

For every search case the project has (the digits CNN, the BN-after-ReLU CNN, the wide-range
trunk, the LOG-spectrum trunk, the shipped `.tflite` corpus in tests/tflite_corpus) and for both
objectives (size first, latency first), two stages on the same source and data, in one process:
`strategy: auto` with its default budget, and `strategy: candidates` over every chain auto can
reach in one move from the chain as written (each alternative of every tier: the other engine,
the LiteRT Quantizer's recipes, other modes; keeping one output's branch, one op type, or the
nodes the as-written trial's per-layer error singles out, float) with a budget that runs them all.
Per case and objective: whether each found a passing model, the trials and search seconds to the
first pass, and the auto winner's size and latency against the best passing candidate of the
exhaustive run (by the same objective). Target: every case found, in at most half the trials.

    .venv/bin/python bench/bench_search_learns.py [--cases digits,bn,trunk,spectrum,corpus]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CORPUS = REPO / "tests" / "tflite_corpus"
from tests.tflite_corpus.make_corpus import images as corpus_images  # noqa: E402

GENAI = "ai_edge_litert.pywrap_genai_ops:GenAIOpsRegisterer"
OBJECTIVES = {"size-first": ["size_bytes", "latency_p50_ms"], "latency-first": ["latency_p50_ms", "size_bytes"]}


def cases(tmp: Path, wanted: set[str]) -> dict[str, dict]:
    """Each case: its model file, data, gates and the metrics it measures."""
    from pipeline_stage.demo import (
        build_log_spectrum_trunk,
        build_wide_range_trunk,
        digits_data,
        raw_digits_data,
        train_bn_after_relu_cnn,
        train_digits_cnn,
    )

    out: dict[str, dict] = {}
    fidelity = [{"metric": "fidelity_sqnr_db", "min": 20}]
    unlabelled = ["fidelity_sqnr_db", "size_bytes", "latency_p50_ms"]
    for key, label, load, train in (
        ("digits", "digits CNN", digits_data, train_digits_cnn),
        ("bn", "BN-after-ReLU CNN", raw_digits_data, train_bn_after_relu_cnn),
    ):
        if key not in wanted:
            continue
        data = load()
        train(data).save(tmp / f"{key}.keras")
        np.savez(tmp / f"{key}-calib.npz", x=data.calibration[0])
        np.savez(tmp / f"{key}-eval.npz", x=data.evaluation[0], y=data.evaluation[1])
        out[label] = {
            "model": tmp / f"{key}.keras",
            "data": {"calibration": str(tmp / f"{key}-calib.npz"), "evaluation": str(tmp / f"{key}-eval.npz")},
            "gates": [{"metric": "accuracy", "max_drop": 0.01}],
            "metrics": ["accuracy", "size_bytes", "latency_p50_ms"],
        }
    for key, label, build in (
        ("trunk", "wide-range trunk", build_wide_range_trunk),
        ("spectrum", "LOG-spectrum trunk", build_log_spectrum_trunk),
    ):
        if key in wanted:
            flatbuffer, inputs = build()
            (tmp / f"{key}.tflite").write_bytes(flatbuffer)
            np.savez(tmp / f"{key}-calib.npz", x=inputs(200))
            np.savez(tmp / f"{key}-eval.npz", x=inputs(300))
            out[label] = {
                "model": tmp / f"{key}.tflite",
                "data": {"calibration": str(tmp / f"{key}-calib.npz"), "evaluation": str(tmp / f"{key}-eval.npz")},
                "gates": fidelity,
                "metrics": unlabelled,
            }
    if "corpus" in wanted:
        images = corpus_images()
        np.savez(tmp / "corpus-calib.npz", x=images[:100])
        np.savez(tmp / "corpus-eval.npz", x=images[100:220])
        for path in sorted(CORPUS.glob("*.tflite")):
            out[f"corpus {path.stem}"] = {
                "model": path,
                "data": {"calibration": str(tmp / "corpus-calib.npz"), "evaluation": str(tmp / "corpus-eval.npz")},
                "gates": [*fidelity, {"metric": "size_bytes", "max_ratio": 0.95}],
                "metrics": unlabelled,
                "registerers": [GENAI] if "custom_op" in path.stem else [],
            }
    return out


def space(case: dict) -> list[list[dict]]:
    """Every chain auto reaches in one move from `quantize: {mode: int8}` on this case's model."""
    from pipeline_stage.contract.moves import ModelFacts
    from pipeline_stage.engine.flatbuffer import read
    from pipeline_stage.host.plugin_host import build_host

    host = build_host(load_entry_points=False)
    base = [("quantize", {"mode": "int8"})]
    kind = "tflite" if str(case["model"]).endswith(".tflite") else "keras"
    facts = ModelFacts(source_kind=kind)
    chains = []
    for name, provided in host.moves.items():
        move = provided.cls()
        if move.kind == "alternative" and move.applies(base):
            chains += [chain for _, chain in move.propose([("quantize", {"mode": "int8"})], facts)]
    if kind == "tflite":
        info = read(Path(case["model"]).read_bytes())
        ops = sorted({n.op for n in info.nodes} - {"DEQUANTIZE", "DENSIFY", "QUANTIZE"})
        chains += [[("quantize", {"mode": "int8", "keep_float_ops": [op]})] for op in ops]
    return [[{name: params} for name, params in chain] for chain in chains]


def stage(tmp: Path, case: dict, objective: list[str], strategy: str, tag: str) -> dict:
    from click.testing import CliRunner

    from pipeline_stage import use_plugins
    from pipeline_stage.cli import cli

    search: dict = {"strategy": strategy, "objective": objective}
    if strategy == "candidates":
        search["candidates"] = space(case)
        search["budget"] = {"trials": len(search["candidates"]) + 1, "seconds": 7200}
    doc = {
        "model": str(case["model"]),
        "data": case["data"],
        "chain": [{"quantize": {"mode": "int8"}}],
        "evaluation": {"metrics": case["metrics"]},
        "gates": case["gates"],
        "search": search,
    }
    path = tmp / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    report = tmp / f"{tag}.json"
    plugins = []
    if case.get("registerers"):
        from pipeline_stage import hookimpl

        class Kernels:
            @hookimpl
            def register_op_resolvers(self, register):
                register(GENAI, ops=["odml.update_kv_cache"])

        plugins.append((Kernels(), "genai-kernels"))
    with use_plugins(*plugins):
        result = CliRunner().invoke(
            cli, ["run", str(path), "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "-q", "--report", str(report)]
        )
    if result.exit_code not in (0, 3):
        raise SystemExit(f"{tag}: exit {result.exit_code}: {result.output[-3000:]}")
    return json.loads(report.read_text())


def summary(report: dict) -> dict:
    trials = report["search"]["trials"]
    first = next((k for k, t in enumerate(trials) if t["status"] == "passed"), None)
    seconds = sum(t["seconds"] for t in trials[: first + 1]) if first is not None else None
    winner = next((t for t in trials if t["index"] == report["search"]["winner"]), None)
    return {
        "trials": len(trials),
        "first_pass": None if first is None else first + 1,
        "seconds_to_pass": seconds,
        "winner": winner,
    }


def best(report: dict, objective: list[str]) -> dict | None:
    passing = [t for t in report["search"]["trials"] if t["status"] == "passed"]
    return min(passing, key=lambda t: tuple(t["metrics"].get(m, float("inf")) for m in objective)) if passing else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="digits,bn,trunk,spectrum,corpus")
    args = ap.parse_args()
    from pipeline_stage.engine.tf_env import import_tf

    import_tf()
    tmp = Path(tempfile.mkdtemp(prefix="bench-search-learns-"))
    rows = []
    for label, case in cases(tmp, set(args.cases.split(","))).items():
        for name, objective in OBJECTIVES.items():
            tag = f"{label}-{name}".replace(" ", "_")
            auto, full = (
                stage(tmp, case, objective, "auto", f"{tag}-auto"),
                stage(tmp, case, objective, "candidates", f"{tag}-all"),
            )
            a, e, top = summary(auto), summary(full), best(full, objective)
            found = "yes" if a["winner"] else ("no (none exists)" if top is None else "**no**")
            ratio = lambda m: (  # noqa: E731
                f"{a['winner']['metrics'][m] / top['metrics'][m]:.2f}x" if a["winner"] and top and top["metrics"].get(m) else "-"
            )
            rows.append(
                (
                    label,
                    name,
                    found,
                    f"{a['first_pass'] or '-'} / {a['trials']}",
                    f"{e['first_pass'] or '-'} / {e['trials']}",
                    f"{auto['search']['seconds']:.1f} / {full['search']['seconds']:.1f}",
                    (a["winner"] or {}).get("origin", "-"),
                    ratio("size_bytes"),
                    ratio("latency_p50_ms"),
                )
            )
            print(" | ".join(rows[-1]), flush=True)
    print(
        "\n| case | objective | auto found a pass | auto: first pass / trials | exhaustive: first pass / trials "
        "| search s (auto / exhaustive) | auto winner | size vs best | latency vs best |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
