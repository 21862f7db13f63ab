"""A MobileNetV2-style model (keras.applications.MobileNetV2, alpha 0.35, 32x32 RGB), trained
briefly on upscaled digits, so depthwise convolutions, BatchNorm, ReLU6 and residual adds go
through fuse, int8, delegates and the tf_keras bridge."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline_stage.engine.flatbuffer import read as read_flatbuffer


def rgb32(x: np.ndarray) -> np.ndarray:
    return np.repeat(np.kron(x, np.ones((1, 4, 4, 1), np.float32)), 3, axis=-1)


@pytest.fixture(scope="session")
def mnv2(mlflow_server, digits_data):
    import keras

    from pipeline_stage.demo import DigitsData, log_source_model

    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(weights=None, alpha=0.35, input_shape=(32, 32, 3), include_top=False, pooling="avg")
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9  # Keras' 0.999 needs far more steps than 1,200 images give
    model = keras.Model(base.input, keras.layers.Dense(10, activation="softmax")(base.output), name="mnv2_digits")
    model.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy")
    data = DigitsData(*((rgb32(x), y) for x, y in (digits_data.train, digits_data.calibration, digits_data.evaluation)))
    model.fit(*data.train, epochs=4, batch_size=32, verbose=0)
    return log_source_model(model, data, name="digits-mnv2", alias="champion"), model, data


def test_mobilenet_fuse_int8_and_delegates(mnv2, tmp_path, run_stage, manifest):
    text = (
        "model: models:/digits-mnv2@champion\n"
        "data: {calibration: 'runs:/${source.run_id}/data/calib.npz', evaluation: 'runs:/${source.run_id}/data/eval.npz'}\n"
        "chain:\n  - fuse: {}\n  - quantize: {mode: int8}\n  - delegates: {targets: [xnnpack, gpu, edgetpu], runs: 20}\n"
        "gates:\n  - {metric: accuracy, max_drop: 0.02}\n"
    )
    result = run_stage(manifest(text))
    assert result.exit_code == 0, result.output
    report = result.report
    assert report["baseline"]["accuracy"] > 0.5  # it learned something in 4 epochs
    fuse = report["steps"][0]["notes"]
    # Every BN follows a convolution: all fold into it, exactly.
    assert fuse["batchnorm_layers"] == len(fuse["folded_into_previous"]) > 30 and fuse["batchnorm_layers_after"] == 0
    assert fuse["max_abs_output_difference"] < 1e-3
    info = read_flatbuffer(result.model_bytes)
    assert info.ops["DEPTHWISE_CONV_2D"] >= 10 and info.ops["ADD"] >= 5  # residual adds kept
    weights = {t.dtype for t in info.tensors if t.is_constant and len(t.shape) == 4}
    assert weights == {"INT8"}
    targets = report["steps"][2]["notes"]["targets"]
    assert targets["xnnpack"]["coverage"] == 1.0


def test_mobilenet_crosses_the_tf_keras_bridge_exactly(mnv2, tmp_path):
    from pipeline_stage.engine.tfmot_bridge import run_task

    _, model, data = mnv2
    x = data.evaluation[0][:16]
    np.savez(tmp_path / "x.npz", x=x)
    run_task({"task": "roundtrip", "data": str(tmp_path / "x.npz")}, model, tmp_path / "bridge")
    assert np.max(np.abs(np.load(tmp_path / "bridge" / "outputs.npy") - model.predict(x, verbose=0))) < 1e-4


def test_litert_quantizer_output_survives_tflite_steps(mnv2, tmp_path, run_stage, manifest):
    """Over 256 KB of weights the LiteRT Quantizer stores buffers after the flatbuffer (offset/size);
    the steps that rewrite the file (strip_ops, delegates' metadata) must carry them across. The
    per-tensor per-channel contrast is measured here too, on a model where it matters."""
    text = (
        "model: models:/digits-mnv2@champion\n"
        "data: {calibration: 'runs:/${source.run_id}/data/calib.npz', evaluation: 'runs:/${source.run_id}/data/eval.npz'}\n"
        "chain:\n  - quantize: {mode: int8, engine: litert, per_channel: false}\n"
        "  - strip_ops: {drop_names: true}\n  - delegates: {targets: [xnnpack], runs: 5}\n"
        "evaluation: {metrics: [accuracy, size_bytes]}\n"
        "gates:\n  - {metric: accuracy, max_drop: 0.05}\n  - {metric: size_bytes, max_ratio: 0.3}\n"
    )
    result = run_stage(manifest(text))
    assert result.exit_code == 0, result.output
    report = result.report
    model_bytes = result.model_bytes
    info = read_flatbuffer(model_bytes)
    kernels = [t for t in info.tensors if t.is_constant and t.dtype == "INT8"]
    assert len(kernels) > 50 and {t.scales for t in kernels} == {1}
    assert info.tensor_name_bytes() == 0 and "delegate_plan" in " ".join(info.metadata)
    # every weight is in the file itself now, and the interpreter agrees with the stage's accuracy
    from ai_edge_litert.interpreter import Interpreter

    _, _, data = mnv2
    runner = Interpreter(model_content=model_bytes).get_signature_runner()
    name = next(iter(runner.get_input_details()))
    hits = [
        int(np.argmax(next(iter(runner(**{name: x[None]}).values()))) == y)
        for x, y in zip(data.evaluation[0][:200], data.evaluation[1][:200])
    ]
    assert abs(np.mean(hits) - report["candidate"]["accuracy"]) < 0.05
    assert report["candidate"]["size_bytes"] == len(model_bytes) < 0.3 * report["baseline"]["size_bytes"]
