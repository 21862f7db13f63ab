"""Float `.tflite` files as they are shipped (tests/tflite_corpus: no SignatureDef, older operator
codes, float16 and sparse weights, fixed batch 1, PReLU and hard-swish, several outputs, TFLite
metadata with a label file, a custom op): the manifest a user writes for an unlabelled model
registers each smaller than the file as shipped and faithful on every output, checked here by
running the registered file with the LiteRT interpreter; what cannot be done is exit 2, naming why."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest

from pipeline_stage import hookimpl, read_flatbuffer, use_plugins
from tests.helpers import sqnr_db, tflite_of
from tests.tflite_corpus.make_corpus import images as corpus_images

CORPUS = Path(__file__).parent / "tflite_corpus"
GENAI = "ai_edge_litert.pywrap_genai_ops:GenAIOpsRegisterer"  # LiteRT's own registerer of the odml.* kernels
# the manifest of the issue: an unlabelled model, a fidelity and a size gate, an auto search
GOAL = dict(
    chain=[{"quantize": {"mode": "int8"}}],
    evaluation={"metrics": ["fidelity_sqnr_db", "size_bytes", "latency_p50_ms"]},
    gates=[{"metric": "fidelity_sqnr_db", "min": 20}, {"metric": "size_bytes", "max_ratio": 0.95}],
    search={"strategy": "auto", "objective": ["size_bytes", "latency_p50_ms"]},
)
SHIPPED = [
    "vision_f16_nosig.tflite",
    "vision_f16_sparse.tflite",
    "vision_old_schema.tflite",
    "vision_three_heads.tflite",
    "vision_metadata.tflite",
]


class GenAIKernels:
    """A plugin giving the interpreter LiteRT's GenAI kernels (odml.update_kv_cache)."""

    @hookimpl
    def register_op_resolvers(self, register):
        register(GENAI, ops=["odml.update_kv_cache", "odml.update_external_kv_cache"])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict:
    """The corpus' real images (offline digits at 32x32x3) as the stage's data files."""
    folder = tmp_path_factory.mktemp("shipped-data")
    x = corpus_images()
    np.savez(folder / "calib.npz", x=x[:100])
    np.savez(folder / "eval.npz", x=x[100:220])
    return {"data": {"calibration": str(folder / "calib.npz"), "evaluation": str(folder / "eval.npz")}, "eval": x[100:220]}


def _outputs(model_bytes: bytes, x: np.ndarray, registerers: list[str] = ()) -> dict[str, np.ndarray]:
    """Every output of a .tflite on `x`, one sample a call, by the LiteRT interpreter itself (in
    output-tensor order, which the stage's rewrite keeps)."""
    from ai_edge_litert import pywrap_genai_ops
    from ai_edge_litert.interpreter import Interpreter, InterpreterWithCustomOps

    loaded = [pywrap_genai_ops.GenAIOpsRegisterer] if registerers else []
    interpreter = (
        InterpreterWithCustomOps(custom_op_registerers=loaded, model_content=model_bytes)
        if loaded
        else Interpreter(model_content=model_bytes)
    )
    interpreter.allocate_tensors()
    inp, outs = interpreter.get_input_details()[0], interpreter.get_output_details()
    rows = {k: [] for k in range(len(outs))}
    for i in range(len(x)):
        interpreter.set_tensor(inp["index"], x[i : i + 1])
        interpreter.invoke()
        for k, d in enumerate(outs):
            rows[k].append(interpreter.get_tensor(d["index"]).astype(np.float64))
    return {k: np.concatenate(v) for k, v in rows.items()}


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_float_tflite_is_registered_smaller_and_faithful(name, images, mlflow_server, manifest, run_stage):
    shipped = (CORPUS / name).read_bytes()
    register = {"name": f"shipped-{name.split('.')[0].replace('_', '-')}", "alias": "edge"}
    result = run_stage(manifest(model=str(CORPUS / name), data=images["data"], **GOAL, register=register))
    assert result.exit_code == 0, result.output
    report = result.report
    registered = tflite_of(report["registered"])
    assert len(registered) < 0.95 * len(shipped), (len(registered), len(shipped))
    assert report["baseline"]["size_bytes"] == len(shipped)  # the baseline is the file as shipped
    sqnr = sqnr_db(_outputs(shipped, images["eval"]), _outputs(registered, images["eval"]))
    assert min(sqnr.values()) >= 20, sqnr
    trials = report["search"]["trials"]
    assert not any("is not an op" in (t.get("error") or "") for t in trials)
    notes = " | ".join(report["source_notes"])
    assert "one sample per call (the model's inputs have a fixed batch of 1)" in notes
    if "nosig" in name or "old_schema" in name:
        assert "no SignatureDef" in notes
    if "old_schema" in name:
        assert "operator code(s) written the older way" in notes
    if "f16" in name:
        assert "DEQUANTIZE" in notes and "float32 constants" in notes
    if "sparse" in name:
        assert "DENSIFY" in notes
    if "metadata" in name:
        # the label file and the TFLite metadata survive into the registered file
        with zipfile.ZipFile(io.BytesIO(registered)) as archive:
            assert archive.read("labels.txt").decode().split() == [str(d) for d in range(10)]
        assert read_flatbuffer(registered).metadata["TFLITE_METADATA"] == read_flatbuffer(shipped).metadata["TFLITE_METADATA"]


def test_hook_register_op_resolvers_a_custom_op_without_its_kernel_is_refused_and_runs_with_one(
    images, mlflow_server, manifest, run_stage
):
    path = manifest(
        model=str(CORPUS / "vision_custom_op.tflite"), data=images["data"], **GOAL, register={"name": "shipped-custom-op"}
    )
    refused = run_stage(path)
    assert refused.exit_code == 2, refused.output
    assert "uses custom op `odml.update_kv_cache`" in refused.stderr and "register_op_resolvers" in refused.stderr
    assert "[baseline]" not in refused.stderr  # refused before any work
    with use_plugins((GenAIKernels(), "genai-kernels")):
        result = run_stage(path)
    assert result.exit_code == 0, result.output
    shipped, registered = (CORPUS / "vision_custom_op.tflite").read_bytes(), tflite_of(result.report["registered"])
    assert "CUSTOM:odml.update_kv_cache" in read_flatbuffer(registered).ops  # the custom op stays, in float
    sqnr = sqnr_db(_outputs(shipped, images["eval"], [GENAI]), _outputs(registered, images["eval"], [GENAI]))
    assert min(sqnr.values()) >= 20, sqnr
    # the registered pyfunc loads the same kernels (recorded in its model config)
    model = mlflow.pyfunc.load_model(result.report["registered"]["uri"])
    assert model.model_config["pipeline_stage.op_registerers"] == [GENAI]
    out = model.predict(images["eval"][:3])
    assert set(out) >= {"cache"} and out["cache"].shape == (3, 4, 2, 5)


def test_an_already_quantized_source_is_said_plainly(digits_model, digits_data, mlflow_server, manifest, run_stage, tmp_path):
    """A full-int8 file: tflite steps run on it, quantizing it again is exit 2 naming what works. An
    int8-weights file (dynamic range): its float weights are recovered, so a recipe applies."""
    import tensorflow as tf

    np.savez(tmp_path / "eval.npz", x=digits_data.evaluation[0], y=digits_data.evaluation[1])
    np.savez(tmp_path / "calib.npz", x=digits_data.calibration[0])
    data = {"calibration": str(tmp_path / "calib.npz"), "evaluation": str(tmp_path / "eval.npz")}
    converter = tf.lite.TFLiteConverter.from_keras_model(digits_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    (tmp_path / "dynamic.tflite").write_bytes(converter.convert())
    converter.representative_dataset = lambda: ([x[None]] for x in digits_data.calibration[0][:50])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    (tmp_path / "int8.tflite").write_bytes(converter.convert())
    gates = [{"metric": "accuracy", "max_drop": 0.05}]
    full = run_stage(
        manifest(model=str(tmp_path / "int8.tflite"), data=data, chain=[{"quantize": {"mode": "int8"}}], gates=gates)
    )
    assert full.exit_code == 2 and "already fully quantized (integer activations)" in full.stderr, full.output
    assert "strip_ops" in full.stderr and "Traceback" not in full.stderr
    stripped = run_stage(
        manifest(model=str(tmp_path / "int8.tflite"), data=data, chain=[{"strip_ops": {}}], gates=gates, name="s.yaml")
    )
    assert stripped.exit_code == 0, stripped.output
    assert any("already fully quantized" in n for n in stripped.report["source_notes"])
    weights = run_stage(
        manifest(
            model=str(tmp_path / "dynamic.tflite"),
            data=data,
            chain=[{"quantize": {"mode": "weight_only"}}],
            gates=gates,
            name="w.yaml",
        )
    )
    assert weights.exit_code == 0, weights.output
    notes = " | ".join(weights.report["source_notes"])
    assert "already weight-quantized" in notes and "recovered as float32" in notes
    assert "INT8" in read_flatbuffer(weights.model_bytes).constant_dtypes()


def test_a_search_where_no_chain_can_make_a_model_is_exit_2_with_each_cause(images, mlflow_server, manifest, run_stage):
    """Every candidate fails on the model itself: a retry would fail the same way, so not exit 1."""
    chain = [{"quantize": {"mode": "int8", "keep_float_ops": ["NOPE"]}}]
    candidates = [[{"quantize": {"mode": "int8", "keep_float_ops": ["BOGUS"]}}]]
    path = manifest(
        model=str(CORPUS / "vision_old_schema.tflite"),
        data=images["data"],
        chain=chain,
        gates=[{"metric": "fidelity_sqnr_db", "min": 20}],
        search={"strategy": "candidates", "candidates": candidates},
    )
    result = run_stage(path)
    assert result.exit_code == 2, result.output
    assert "no search trial produced a model" in result.stderr
    assert "trial 1 (as written): keep_float_ops: the model has no `NOPE` op" in result.stderr
    assert "trial 2 (candidate 1): keep_float_ops: the model has no `BOGUS` op" in result.stderr


def test_the_rewrite_for_engines_is_exact_and_names_what_it_did():
    """Older op codes normalized, float16 and sparse weights folded to float32, a signature added:
    the outputs are bit for bit the file's own (the interpreter computed the constants)."""
    from pipeline_stage import shipped_tflite_for_engines

    x = corpus_images()[:8]
    for name in ("vision_old_schema.tflite", "vision_f16_nosig.tflite", "vision_f16_sparse.tflite"):
        shipped = (CORPUS / name).read_bytes()
        prepared = shipped_tflite_for_engines(shipped)
        info = read_flatbuffer(prepared.model_bytes)
        assert info.signatures == ["serving_default"] and not {"DEQUANTIZE", "DENSIFY"} & set(info.ops), (name, info.ops)
        assert {t.dtype for t in info.tensors if t.is_constant and len(t.shape) > 1} == {"FLOAT32"}
        before, after = _outputs(shipped, x), _outputs(prepared.model_bytes, x)
        assert all(np.array_equal(before[k], after[k]) for k in before), name
        assert prepared.notes, name
    sizes = json.loads((CORPUS / "sizes.json").read_text())
    assert sum(sizes.values()) < 1_000_000  # the corpus stays small


def test_ops_the_engine_has_no_integer_recipe_for_stay_float_and_are_listed(images, mlflow_server, manifest, run_stage):
    """Full int8 of a file with PReLU: the LiteRT Quantizer leaves it float (no failure), and the
    quantize step's engine notes say so and why."""
    path = manifest(model=str(CORPUS / "vision_old_schema.tflite"), data=images["data"], chain=[{"quantize": {"mode": "int8"}}])
    result = run_stage(path)
    assert result.exit_code == 0, result.output
    kept = result.report["steps"][0]["notes"]["engine"]["kept_float_by_engine"]
    assert kept["ops"].get("PRELU") == 1 and "no integer recipe" in kept["why"]
    assert "INT8" in read_flatbuffer(result.model_bytes).activation_dtypes()
