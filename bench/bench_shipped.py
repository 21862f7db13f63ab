"""Benchmark: float `.tflite` files as shipped (tests/tflite_corpus) through the manifest a user
writes for an unlabelled model (quantize int8, fidelity >= 20 dB and size <= 0.95x gates, an auto
search by size then latency), in one process against a local sqlite store.

Per file: the registered file's bytes over the shipped file's, its worst-output SQNR against the
shipped file (recomputed here with the LiteRT interpreter, one sample a call), the recipe the search
settled on, the search's seconds and trials, and what the source had to rewrite for the engines.
The custom-op file runs with a plugin registering LiteRT's GenAI kernels.

    .venv/bin/python bench/bench_shipped.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CORPUS = REPO / "tests" / "tflite_corpus"
from tests.helpers import sqnr_db  # noqa: E402
from tests.tflite_corpus.make_corpus import images as corpus_images  # noqa: E402

GENAI = "ai_edge_litert.pywrap_genai_ops:GenAIOpsRegisterer"


def outputs(model_bytes: bytes, x: np.ndarray, custom: bool) -> dict[str, np.ndarray]:
    from pipeline_stage.engine.litert_runtime import TFLiteModel

    model = TFLiteModel(model_bytes, op_registerers=[GENAI] if custom else [])
    return model.predict_outputs(x)


def main() -> None:
    from click.testing import CliRunner

    from pipeline_stage import hookimpl, use_plugins
    from pipeline_stage.cli import cli
    from pipeline_stage.engine.tf_env import import_tf

    import_tf()
    tmp = Path(tempfile.mkdtemp(prefix="bench-shipped-"))
    images = corpus_images()
    np.savez(tmp / "calib.npz", x=images[:100])
    np.savez(tmp / "eval.npz", x=images[100:220])

    class Kernels:
        @hookimpl
        def register_op_resolvers(self, register):
            register(GENAI, ops=["odml.update_kv_cache"])

    rows = []
    for path in sorted(CORPUS.glob("*.tflite")):
        custom = "custom_op" in path.stem
        doc = {
            "model": str(path),
            "data": {"calibration": str(tmp / "calib.npz"), "evaluation": str(tmp / "eval.npz")},
            "chain": [{"quantize": {"mode": "int8"}}],
            "evaluation": {"metrics": ["fidelity_sqnr_db", "size_bytes", "latency_p50_ms"]},
            "gates": [{"metric": "fidelity_sqnr_db", "min": 20}, {"metric": "size_bytes", "max_ratio": 0.95}],
            "search": {"strategy": "auto", "objective": ["size_bytes", "latency_p50_ms"]},
        }
        manifest, report = tmp / f"{path.stem}.yaml", tmp / f"{path.stem}.json"
        manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
        args = ["run", str(manifest), "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "-q"]
        args += ["--report", str(report), "--output", str(tmp / f"{path.stem}.out.tflite")]
        with use_plugins(*([(Kernels(), "genai-kernels")] if custom else [])):
            result = CliRunner().invoke(cli, args)
        data = json.loads(report.read_text())
        if result.exit_code != 0:
            rows.append((path.name, f"{len(path.read_bytes()):,}", f"exit {result.exit_code}", "-", "-", "-", "-"))
            continue
        shipped, out = path.read_bytes(), (tmp / f"{path.stem}.out.tflite").read_bytes()
        x = images[100:220]
        ref, got = outputs(shipped, x, custom), outputs(out, x, custom)
        # By output name: the registered file's SignatureDef may list the outputs in another order.
        sqnr = min(sqnr_db(ref, got).values())
        search = data["search"]
        winner = next(t for t in search["trials"] if t["index"] == search["winner"])
        rows.append(
            (
                path.name,
                f"{len(shipped):,}",
                f"{len(out) / len(shipped):.2f}x",
                f"{sqnr:.1f}",
                winner["origin"],
                f"{search['seconds']:.1f} ({len(search['trials'])} trials)",
                "; ".join(data["source_notes"]),
            )
        )
        print(" | ".join(rows[-1]), flush=True)
    print(
        "\n| file | shipped bytes | registered / shipped | worst-output SQNR (dB) | recipe settled on | search s (trials) "
        "| what the source rewrote for the engines |"
    )
    print("| --- | ---: | ---: | ---: | --- | ---: | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
