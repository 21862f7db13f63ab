"""Sources beyond a Keras model: a SavedModel signature of choice, and a float .tflite as the source (what vendors and other exporters hand over): quantized with the
LiteRT Quantizer, tflite-phase steps run on it, model-phase steps and the converter engine are
refused with a fix, and one stage's registered version is the next stage's source."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline_stage.engine.flatbuffer import read as read_flatbuffer


@pytest.fixture(scope="module")
def float_tflite(digits_model, digits_data, tmp_path_factory) -> dict[str, Path]:
    import tensorflow as tf

    folder = tmp_path_factory.mktemp("tflite-source")
    path = folder / "digits-float.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(digits_model).convert())
    np.savez(folder / "calib.npz", x=digits_data.calibration[0], y=digits_data.calibration[1])
    np.savez(folder / "eval.npz", x=digits_data.evaluation[0], y=digits_data.evaluation[1])
    return {"model": path, "calib": folder / "calib.npz", "eval": folder / "eval.npz"}


ACCURACY_GATE = [{"metric": "accuracy", "max_drop": 0.02}]


def _data(src: dict[str, Path]) -> dict[str, str]:
    return {"calibration": str(src["calib"]), "evaluation": str(src["eval"])}


def test_a_float_tflite_is_quantized_by_the_litert_quantizer_and_chained(
    float_tflite, mlflow_server, tmp_path, run_stage, manifest
):
    path = manifest(
        model=str(float_tflite["model"]),
        data=_data(float_tflite),
        chain="  - quantize: {mode: int8, engine: litert}\n  - analyze: {}\n",
        gates=ACCURACY_GATE,
        extra="register: {name: digits-from-tflite, alias: chained}\n",
    )
    result = run_stage(path)
    assert result.exit_code == 0, result.output
    report = result.report
    # the baseline is the .tflite itself, not a conversion of anything
    assert report["baseline_tflite"]["size_bytes"] == float_tflite["model"].stat().st_size
    assert report["baseline"]["accuracy"] == report["baseline_tflite"]["accuracy"]
    assert read_flatbuffer(result.model_bytes).constant_dtypes()["INT8"] > 0
    assert report["candidate"]["accuracy"] >= report["baseline"]["accuracy"] - 0.02
    # the registered version is a source for the next stage (a tflite-phase chain on it)
    uri = report["registered"]["uri"]
    nxt = manifest(
        model=uri, data=_data(float_tflite), chain="  - delegates: {targets: [xnnpack], benchmark: false}\n", gates=ACCURACY_GATE
    )
    nxt.rename(tmp_path / "next.yaml")
    again = run_stage(tmp_path / "next.yaml")
    # that version is int8 already: tflite steps run on it, the report says what it is, and
    # quantizing it again is refused, saying so
    assert again.exit_code == 0, again.output
    assert any("already fully quantized" in n for n in again.report["source_notes"])
    requant = manifest(
        model=uri, data=_data(float_tflite), chain="  - quantize: {mode: int8}\n", gates=ACCURACY_GATE, name="q.yaml"
    )
    refused = run_stage(requant)
    assert refused.exit_code == 2 and "already fully quantized (integer activations)" in refused.stderr, refused.output


def test_a_tflite_source_refuses_model_steps_and_the_converter_engine(
    float_tflite, mlflow_server, tmp_path, run_stage, invoke, manifest
):
    fuse = run_stage(
        manifest(
            model=str(float_tflite["model"]),
            data=_data(float_tflite),
            chain="  - fuse: {}\n  - quantize: {mode: int8, engine: litert}\n",
            gates=ACCURACY_GATE,
        )
    )
    assert fuse.exit_code == 2 and "step `fuse` edits the source's model" in fuse.stderr and "is a .tflite file" in fuse.stderr
    assert "fix: " in fuse.stderr and "[baseline]" not in fuse.stderr  # refused before any work
    converter = run_stage(
        manifest(
            model=str(float_tflite["model"]),
            data=_data(float_tflite),
            chain="  - quantize: {mode: int8, engine: converter}\n",
            gates=ACCURACY_GATE,
        )
    )
    assert converter.exit_code == 2 and "the source is a `tflite` model" in converter.stderr
    assert "leave `engine` at auto" in converter.stderr and "[baseline]" not in converter.stderr
    # the URI shows the kind: `validate` says it already
    checked = invoke(
        "validate",
        str(
            manifest(
                model=str(float_tflite["model"]),
                data=_data(float_tflite),
                chain="  - quantize: {mode: qat}\n",
                gates=ACCURACY_GATE,
            )
        ),
    )
    assert checked.exit_code == 2 and "quantization-aware training fine-tunes the Keras model" in checked.stderr


def test_a_float_tflite_registered_by_a_stage_is_a_source(float_tflite, mlflow_server, tmp_path, run_stage, invoke, manifest):
    """Stages chain: a float16 stage registers a version, the next stage quantizes that version."""
    # a stage before it logged the same content under the same file names from elsewhere: MLflow
    # files datasets by name and digest, and the next stage must still get this stage's URIs
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    copies = {k: elsewhere / float_tflite[k].name for k in ("calib", "eval")}
    for k, path in copies.items():
        path.write_bytes(float_tflite[k].read_bytes())
    earlier = run_stage(
        manifest(
            model=str(float_tflite["model"]),
            data=_data({**float_tflite, **copies}),
            chain="  - strip_ops: {}\n",
            gates=ACCURACY_GATE,
        )
    )
    assert earlier.exit_code == 0, earlier.output
    first = manifest(
        model=str(float_tflite["model"]),
        data=_data(float_tflite),
        chain="  - strip_ops: {}\n",
        gates=ACCURACY_GATE,
        extra="register: {name: digits-float-stage}\n",
    )
    result = run_stage(first)
    assert result.exit_code == 0, result.output
    uri = result.report["registered"]["uri"]
    # a registry URI does not show the kind: an engine that cannot take it is refused after the
    # download, before the baseline
    refused = manifest(
        model=uri, data=_data(float_tflite), chain="  - quantize: {mode: dynamic, engine: converter}\n", gates=ACCURACY_GATE
    )
    assert invoke("validate", str(refused)).exit_code == 0
    result = run_stage(refused)
    assert result.exit_code == 2 and "the converter engine needs the TensorFlow model" in result.stderr, result.output
    assert "[baseline]" not in result.stderr
    # `engine: auto` (the default) takes it with the LiteRT Quantizer; its data are the datasets the
    # first stage's run logged as its inputs, by name
    second = tmp_path / "second.yaml"
    second.write_text(
        f"model: {uri}\ndata: {{calibration: 'dataset:calib.npz', evaluation: 'dataset:eval.npz'}}\n"
        "chain:\n  - quantize: {mode: dynamic}\ngates:\n  - {metric: accuracy, max_drop: 0.02}\n"
    )
    result = run_stage(tmp_path / "second.yaml")
    assert result.exit_code == 0, result.output
    report = result.report
    assert report["source"]["uri"] == uri and report["candidate"]["size_bytes"] < 0.5 * report["baseline"]["size_bytes"]
    import mlflow

    logged = {
        i.dataset.name: json.loads(i.dataset.source)["uri"]
        for i in mlflow.MlflowClient().get_run(report["run_id"]).inputs.dataset_inputs
    }
    assert logged == {"calib.npz": str(float_tflite["calib"]), "eval.npz": str(float_tflite["eval"])}
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(second.read_text().replace("dataset:eval.npz", "dataset:holdout.npz"))
    result = run_stage(unknown)
    assert result.exit_code == 2 and "logged no dataset `holdout.npz` (logged: calib.npz, eval.npz)" in result.stderr


def test_a_savedmodel_signature_of_choice(mlflow_server, tmp_path, run_stage, manifest):
    """A tf.Module with two signatures: `signature: double` optimizes that one (checked on the
    .tflite's outputs with the LiteRT interpreter); an unknown signature is refused, naming them."""
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    weights = np.arange(8, dtype=np.float32).reshape(4, 2) / 8.0

    class Model(tf.Module):
        def __init__(self):
            self.w = tf.Variable(weights)

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def serve(self, x):
            return {"y": tf.matmul(x, self.w)}

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def double(self, x):
            return {"y": 2.0 * tf.matmul(x, self.w)}

    module = Model()
    tf.saved_model.save(module, str(tmp_path / "sm"), signatures={"serving_default": module.serve, "double": module.double})
    x = np.random.default_rng(0).uniform(size=(32, 4)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    text = (
        f"model: {tmp_path / 'sm'}\nsignature: double\ndata: {{evaluation: {tmp_path / 'x.npz'}}}\n"
        "chain: []\ngates:\n  - {metric: fidelity_sqnr_db, min: 60}\n"
    )
    result = run_stage(manifest(text))
    assert result.exit_code == 0, result.output
    runner = Interpreter(model_path=str(result.output_path)).get_signature_runner()
    name = next(iter(runner.get_input_details()))
    out = next(iter(runner(**{name: x}).values()))
    np.testing.assert_allclose(out, 2.0 * x @ weights, rtol=1e-5)
    missing = run_stage(manifest(text.replace("double", "triple"), name="bad.yaml"))
    assert missing.exit_code == 2 and "has no signature `triple` (signatures: double, serving_default)" in missing.stderr


def test_a_model_logged_with_the_keras_flavor_loads(digits_model, digits_data, mlflow_server, tmp_path, run_stage, manifest):
    """MLflow's keras flavor (mlflow.keras.log_model) as well as the tensorflow flavor the demo uses."""
    import mlflow

    with mlflow.start_run(run_name="keras-flavor"):
        info = mlflow.keras.log_model(digits_model, name="model", registered_model_name="digits-keras-flavor")
    np.savez(tmp_path / "eval.npz", x=digits_data.evaluation[0], y=digits_data.evaluation[1])
    text = (
        f"model: models:/digits-keras-flavor/{info.registered_model_version}\ndata: {{evaluation: {tmp_path / 'eval.npz'}}}\n"
        "chain:\n  - quantize: {mode: float16}\ngates:\n  - {metric: accuracy, max_drop: 0.01}\n  - {metric: fidelity_sqnr_db, min: 30}\n"
    )
    result = run_stage(manifest(text))
    assert result.exit_code == 0, result.output
    assert result.report["source"]["name"] == "digits-keras-flavor"


def test_a_savedmodel_with_two_inputs_and_two_outputs_and_no_labels(mlflow_server, tmp_path, run_stage, manifest):
    """A tf.Module signature with inputs `a`, `b` and outputs `sum`, `product`: calibrated on both
    inputs, measured on both outputs, gated on fidelity alone."""
    import tensorflow as tf

    class Model(tf.Module):
        def __init__(self):
            self.w = tf.Variable(np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3))

        @tf.function(
            input_signature=[tf.TensorSpec([None, 4], tf.float32, name="a"), tf.TensorSpec([None, 4], tf.float32, name="b")]
        )
        def serve(self, a, b):
            return {"sum": tf.matmul(a + b, self.w), "product": tf.matmul(a * b, self.w)}

    module = Model()
    tf.saved_model.save(module, str(tmp_path / "sm"), signatures={"serving_default": module.serve})
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "ab.npz", a=rng.uniform(0, 1, (64, 4)).astype(np.float32), b=rng.uniform(0, 1, (64, 4)).astype(np.float32)
    )
    text = (
        f"model: {tmp_path / 'sm'}\ndata: {{calibration: {tmp_path / 'ab.npz'}, evaluation: {tmp_path / 'ab.npz'}}}\n"
        "chain:\n  - quantize: {mode: int8}\ngates:\n  - {metric: fidelity_sqnr_db, min: 20}\n"
    )
    result = run_stage(manifest(text))
    assert result.exit_code == 0, result.output
    candidate = result.report["candidate"]
    assert {"fidelity_sqnr_db.sum", "fidelity_sqnr_db.product"} <= set(candidate)
    assert candidate["fidelity_sqnr_db"] == min(candidate["fidelity_sqnr_db.sum"], candidate["fidelity_sqnr_db.product"]) >= 20
