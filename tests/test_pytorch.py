"""PyTorch models from MLflow (the `pytorch` source and the `pt2e` engine, extra `[torch]`): models
of the project's own (tests/torch_models.py), trained here on the offline digits and logged the
ways teams log them, go through the manifest a user writes for a Keras model and come out
registered faithful, checked against PyTorch's own outputs computed in the test by running the
registered file with the LiteRT interpreter; what cannot be done is exit 2, naming why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from pipeline_stage import read_flatbuffer
from tests import torch_models
from tests.helpers import REPO, signature_outputs, sqnr, tflite_of, versions_of

DATA = {"calibration": "runs:/${source.run_id}/data/calib.npz", "evaluation": "runs:/${source.run_id}/data/eval.npz"}
# the manifest a user writes for a Keras digits model, as it is
GOAL = dict(
    data=DATA,
    chain=[{"quantize": {"mode": "int8"}}],
    evaluation={"metrics": ["accuracy", "fidelity_sqnr_db", "size_bytes", "latency_p50_ms"]},
    gates=[
        {"metric": "fidelity_sqnr_db", "min": 20},
        {"metric": "accuracy", "max_drop": 0.02},
        {"metric": "size_bytes", "max_ratio": 0.5},
    ],
    search={"strategy": "auto", "objective": ["size_bytes"]},
)
EVAL = slice(1200, 1500)


@pytest.fixture(scope="module")
def logged(mlflow_server, tmp_path_factory) -> dict:
    """The digits CNN (pt2 with a dynamic batch, and pickled) and a two-input, two-output module
    (pt2 with a signature of named tensors), each trained once and registered with its data."""
    x, y = torch_models.digits_nchw()
    side = torch_models.extra_features
    folder = tmp_path_factory.mktemp("torch-models")
    cnn = torch_models.train(torch_models.DigitsCNN(), (x[:1200],), y[:1200])
    two = torch_models.train(torch_models.TwoInTwoOut(), (x[:1200], side(x[:1200])), y[:1200], epochs=12)
    digits = {"calib": {"x": x[:200]}, "eval": {"x": x[EVAL], "y": y[EVAL]}}
    torch_models.log(cnn, (x[:5],), "pt2", "torch-digits", digits, folder / "digits")
    torch_models.log(cnn, (x[:5],), "pickle", "torch-digits-pickled", digits, folder / "digits")
    both = {"image": x[:5], "side": side(x[:5])}
    out = torch_models.outputs(two, tuple(both.values()))
    signature = torch_models.signature(both, {"logits": out[0].astype(np.float32), "box": out[1].astype(np.float32)})
    two_data = {
        "calib": {"image": x[:200], "side": side(x[:200])},
        "eval": {"image": x[EVAL], "side": side(x[EVAL]), "y.logits": y[EVAL]},
    }
    torch_models.log(two, tuple(both.values()), "pt2", "torch-two-heads", two_data, folder / "two", signature=signature)
    return {"x": x[EVAL], "y": y[EVAL], "side": side(x[EVAL]), "cnn": cnn, "two": two, "digits_data": folder / "digits"}


def _run(model_bytes: bytes, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Every output of a .tflite by its signature, one sample a call (as converted: batch 1), by
    the LiteRT interpreter, in the signature's output order."""
    return list(signature_outputs(model_bytes, inputs).values())


def _integer_tensors(model_bytes: bytes) -> int:
    return read_flatbuffer(model_bytes).summary()["activation_dtypes"].get("INT8", 0)


def test_a_pt2_model_goes_through_the_keras_manifest_and_is_registered_faithful(logged, manifest, run_stage):
    result = run_stage(manifest(model="models:/torch-digits/1", **GOAL, register={"name": "torch-digits-edge", "alias": "edge"}))
    assert result.exit_code == 0, result.output
    report = result.report
    assert report["source"]["kind"] == "pytorch"
    registered = tflite_of(report["registered"])
    assert _integer_tensors(registered) > 0  # int8 activations in the flatbuffer
    # faithful to PyTorch's own outputs, computed here
    reference = torch_models.outputs(logged["cnn"], (logged["x"],))[0]
    (candidate,) = _run(registered, {"x": logged["x"]})
    assert sqnr(reference, candidate) >= 20
    assert (candidate.argmax(1) == logged["y"]).mean() >= (reference.argmax(1) == logged["y"]).mean() - 0.02
    # the baseline is PyTorch: the float conversion's own fidelity to it is reported beside the candidate's
    assert report["baseline"]["accuracy"] == pytest.approx((reference.argmax(1) == logged["y"]).mean())
    assert report["baseline_tflite"]["fidelity_sqnr_db"] >= 60  # float .tflite vs PyTorch
    # the search tried both engines on the PyTorch source
    assert any("engine=pt2e" in t["chain"] for t in report["search"]["trials"]), report["search"]["trials"]
    assert mlflow.MlflowClient().get_model_version_by_alias("torch-digits-edge", "edge").version == "1"
    assert "Float .tflite vs the source" in (Path(result.report_path).with_suffix(".md")).read_text()


def test_the_pt2e_engine_quantizes_statically_and_dynamically_with_float_edges(logged, manifest, run_stage):
    for mode in ("int8", "dynamic"):
        chain = [{"quantize": {"mode": mode, "engine": "pt2e"}}]
        gates = [{"metric": "fidelity_sqnr_db", "min": 20}]
        result = run_stage(manifest(model="models:/torch-digits/1", data=DATA, chain=chain, gates=gates))
        assert result.exit_code == 0, result.output
        model = read_flatbuffer(result.model_bytes)
        assert model.summary()["weight_dtypes"].get("INT8", 0) >= 3  # every conv and dense weight
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_content=result.model_bytes)
        assert {d["dtype"] for d in interpreter.get_input_details() + interpreter.get_output_details()} == {np.float32}
        assert result.report["conversion"]["settings"]["engine"] == "pt2e"
        reference = torch_models.outputs(logged["cnn"], (logged["x"],))[0]
        assert sqnr(reference, _run(result.model_bytes, {"x": logged["x"]})[0]) >= 20


def test_a_pickled_model_is_refused_unless_the_manifest_allows_it(logged, manifest, run_stage):
    sections = dict(model="models:/torch-digits-pickled/1", **GOAL, register={"name": "torch-pickled-edge"})
    refused = run_stage(manifest(**sections))
    assert refused.exit_code == 2, refused.output
    assert "pickled PyTorch model" in refused.stderr and "allow_unsafe_deserialization: true" in refused.stderr
    assert versions_of("torch-pickled-edge") == []
    allowed = run_stage(manifest(allow_unsafe_deserialization="true", **sections))
    assert allowed.exit_code == 0, allowed.output
    reference = torch_models.outputs(logged["cnn"], (logged["x"],))[0]
    assert sqnr(reference, _run(tflite_of(allowed.report["registered"]), {"x": logged["x"]})[0]) >= 20


def test_two_inputs_and_two_outputs_by_their_signature_names(logged, manifest, run_stage):
    goal = {**GOAL, "gates": [{"metric": "fidelity_sqnr_db", "min": 20}, {"metric": "accuracy.logits", "max_drop": 0.03}]}
    result = run_stage(manifest(model="models:/torch-two-heads/1", **goal, register={"name": "torch-two-heads-edge"}))
    assert result.exit_code == 0, result.output
    registered = tflite_of(result.report["registered"])
    inputs = {"image": logged["x"], "side": logged["side"]}
    runner_outputs = _run(registered, inputs)
    reference = torch_models.outputs(logged["two"], (logged["x"], logged["side"]))
    from ai_edge_litert.interpreter import Interpreter

    signature = Interpreter(model_content=registered).get_signature_list()["serving_default"]
    assert signature["inputs"] == ["image", "side"] and sorted(signature["outputs"]) == ["box", "logits"]
    by_name = dict(zip(sorted(signature["outputs"]), runner_outputs))  # the runner returns them by name, sorted
    assert sqnr(reference[0], by_name["logits"]) >= 20 and sqnr(reference[1], by_name["box"]) >= 20


def test_channels_last_registers_an_nhwc_model_from_nchw_data(logged, manifest, run_stage):
    result = run_stage(
        manifest(
            model="models:/torch-digits/1",
            **GOAL,
            conversion={"io_layout": "channels_last"},
            register={"name": "torch-digits-nhwc"},
        )
    )
    assert result.exit_code == 0, result.output
    registered = tflite_of(result.report["registered"])
    from ai_edge_litert.interpreter import Interpreter

    assert list(Interpreter(model_content=registered).get_input_details()[0]["shape"]) == [1, 8, 8, 1]
    nhwc = np.transpose(logged["x"], (0, 2, 3, 1))
    reference = torch_models.outputs(logged["cnn"], (logged["x"],))[0]
    assert sqnr(reference, _run(registered, {"x": nhwc})[0]) >= 20
    # the registered model's MLflow signature says the layout
    signature = mlflow.models.get_model_info(result.report["registered"]["uri"]).signature
    assert tuple(signature.inputs.inputs[0].shape)[1:] == (8, 8, 1)
    assert any("channels last" in note for note in result.report["source_notes"])


def test_steps_that_edit_a_keras_model_are_refused_naming_what_works(logged, manifest, run_stage, invoke, tmp_path):
    import torch

    program = torch.export.export(logged["cnn"], (torch.from_numpy(logged["x"][:1]),))
    torch.export.save(program, tmp_path / "digits.pt2")
    chain = [{"prune": {"target_sparsity": 0.5}}, {"quantize": {"mode": "int8"}}]
    with_training = {**DATA, "training": DATA["evaluation"]}
    # the URI shows the kind: refused at validate
    at_validate = invoke("validate", str(manifest(model=str(tmp_path / "digits.pt2"), data=with_training, chain=chain)))
    assert at_validate.exit_code == 2, at_validate.output
    assert "torch.nn.utils.prune" in at_validate.output
    # a registry URI: refused once the model is opened, before the baseline
    refused = run_stage(manifest(model="models:/torch-digits/1", data=with_training, chain=chain))
    assert refused.exit_code == 2 and "torch.nn.utils.prune" in refused.stderr, refused.output
    assert "[baseline]" not in refused.stderr
    converter = run_stage(manifest(model="models:/torch-digits/1", data=DATA, chain=[{"quantize": {"engine": "converter"}}]))
    assert converter.exit_code == 2 and "converter engine needs the TensorFlow model" in converter.stderr
    # the bare .pt2 file itself is a source
    data = {"calibration": str(logged["digits_data"] / "calib.npz"), "evaluation": str(logged["digits_data"] / "eval.npz")}
    plain = run_stage(manifest(model=str(tmp_path / "digits.pt2"), data=data, chain=[{"quantize": {"mode": "int8"}}]))
    assert plain.exit_code == 0, plain.output
    # exported from one sample, its batch is fixed: PyTorch is run one sample a call, no batch retried
    assert any("fixed batch of 1" in note for note in plain.report["source_notes"])
    assert not any("retried" in note for note in plain.report.get("evaluation_notes", []))


def test_without_the_torch_extra_it_stops_before_the_download_and_the_run(logged, manifest):
    """torch and litert-torch made unimportable in a process of its own (what an install without
    the extra is to Python): exit 2 naming the flavor and the extra, and no MLflow run created."""
    path = manifest(model="models:/torch-digits/1", **GOAL, register={"name": "torch-never"})
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("pipeline-stage")
    before = len(client.search_runs([experiment.experiment_id])) if experiment else 0
    code = (
        "import sys; sys.modules['torch'] = sys.modules['litert_torch'] = None\n"
        "from pipeline_stage.cli import main\n"
        f"sys.argv = ['pipeline-stage', 'run', {str(path)!r}]\nmain()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=dict(os.environ), timeout=300
    )
    assert done.returncode == 2, done.stderr
    assert "MLflow flavor `pytorch`" in done.stderr and "pip install 'pipeline-stage[torch]'" in done.stderr
    experiment = client.get_experiment_by_name("pipeline-stage")
    assert (len(client.search_runs([experiment.experiment_id])) if experiment else 0) == before
