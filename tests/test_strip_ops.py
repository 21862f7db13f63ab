"""`strip_ops`: cut an auxiliary head from the flatbuffer, drop conversion metadata, and write the
operator list for a selective LiteRT build."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pytest

from pipeline_stage.engine.flatbuffer import read


@pytest.fixture(scope="session")
def aux_head_source(mlflow_server, digits_data):
    """A digits CNN with an auxiliary regression head (a training-only branch), in MLflow."""
    import keras

    from pipeline_stage.engine.tf_env import stdout_to_stderr

    keras.utils.set_random_seed(2)
    inp = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Flatten()(keras.layers.Conv2D(16, 3, activation="relu")(inp))
    main = keras.layers.Dense(10, activation="softmax", name="probabilities")(h)
    aux = keras.layers.Dense(1, name="aux")(keras.layers.Dense(64, activation="relu")(h))
    model = keras.Model(inp, {"probabilities": main, "aux": aux})
    model.compile("adam", {"probabilities": "sparse_categorical_crossentropy", "aux": "mse"})
    x, y = digits_data.train
    model.fit(x, {"probabilities": y, "aux": y.astype("float32")}, epochs=6, verbose=0)
    with mlflow.start_run(run_name="train-aux-head") as run, tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "eval.npz", x=digits_data.evaluation[0], y=digits_data.evaluation[1])
        mlflow.log_artifact(str(Path(tmp) / "eval.npz"), "data")
        with stdout_to_stderr():
            info = mlflow.tensorflow.log_model(model, name="model", registered_model_name="digits-aux-head")
    mlflow.MlflowClient().set_registered_model_alias("digits-aux-head", "champion", info.registered_model_version)
    return run.info.run_id


def test_strip_aux_head_and_write_ops_json(aux_head_source, tmp_path, run_stage, manifest):
    text = (
        "model: models:/digits-aux-head@champion\n"
        "data: {evaluation: 'runs:/${source.run_id}/data/eval.npz'}\n"
        "chain:\n  - strip_ops: {outputs: [probabilities], drop_names: true}\n"
        "gates:\n  - {metric: accuracy, max_drop: 0.001}\n  - {metric: size_bytes, max_ratio: 0.5}\n"
    )
    result = run_stage(manifest(text))
    assert result.exit_code == 0, result.output
    report = result.report
    notes = report["steps"][0]["notes"]
    assert notes["removed_outputs"] == ["aux"] and notes["dropped_metadata"] == ["CONVERSION_METADATA"]
    assert notes["bytes_saved"] > 0.5 * notes["bytes_before"]  # the aux head's 64x512 weights are gone
    info = read(result.model_bytes)
    assert info.ops["FULLY_CONNECTED"] == 1 and report["baseline_flatbuffer"]["ops"]["FULLY_CONNECTED"] == 3
    assert "CONVERSION_METADATA" not in info.metadata and "min_runtime_version" in info.metadata
    # drop_names: no tensor names left, the signature (which names its own inputs/outputs) still runs
    assert info.tensor_name_bytes() == 0 and notes["dropped_name_bytes"] > 0
    from ai_edge_litert.interpreter import Interpreter

    assert Interpreter(model_content=result.model_bytes).get_signature_list() == {
        "serving_default": {"inputs": ["image"], "outputs": ["probabilities"]}
    }
    ops = json.loads(
        Path(mlflow.artifacts.download_artifacts(run_id=report["run_id"], artifact_path="steps/0-strip_ops/ops.json")).read_text()
    )
    assert {o["op"] for o in ops["builtin_ops"]} == set(info.ops) and ops["custom_ops"] == []


def test_unknown_output_is_a_clear_error(aux_head_source, tmp_path, run_stage, manifest):
    text = "model: models:/digits-aux-head@champion\nchain:\n  - strip_ops: {outputs: [logits]}\n"
    result = run_stage(manifest(text))
    assert result.exit_code == 2
    assert "no output ['logits'] in signature `serving_default` (outputs: ['aux', 'probabilities'])" in result.stderr
