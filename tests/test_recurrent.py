"""Recurrent models: a Keras 3 LSTM converts to TensorList ops the builtins lack (named in a clear
error); unrolled, it converts, quantizes and keeps its accuracy."""

from __future__ import annotations

import pytest

from pipeline_stage.demo import DigitsData


@pytest.fixture(scope="module")
def lstm_sources(mlflow_server, digits_data):
    import keras

    from pipeline_stage.demo import log_source_model

    rows = DigitsData(*[(x[..., 0], y) for x, y in (digits_data.train, digits_data.calibration, digits_data.evaluation)])
    out = {}
    for unroll in (False, True):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((8, 8)), keras.layers.LSTM(32, unroll=unroll), keras.layers.Dense(10, activation="softmax")]
        )
        model.compile(keras.optimizers.Adam(5e-3), "sparse_categorical_crossentropy")
        model.fit(*rows.train, epochs=10, batch_size=32, verbose=0)
        out[unroll] = log_source_model(model, rows, name=f"digits-lstm-{'unrolled' if unroll else 'loop'}")
    return out


TEXT = (
    "model: models:/{name}@champion\n"
    "data: {{calibration: 'runs:/${{source.run_id}}/data/calib.npz', evaluation: 'runs:/${{source.run_id}}/data/eval.npz'}}\n"
    "chain:\n  - quantize: {{mode: {mode}}}\ngates:\n  - {{metric: accuracy, max_drop: 0.02}}\n"
)


def test_lstm_loop_is_refused_with_the_op_named(lstm_sources, tmp_path, run_stage, manifest):
    result = run_stage(manifest(TEXT.format(name="digits-lstm-loop", mode="dynamic")))
    assert result.exit_code == 2, result.output
    assert "tf.TensorListReserve" in result.stderr and "allow_select_tf_ops" in result.stderr


@pytest.mark.parametrize("mode", ["dynamic", "int8"])
def test_unrolled_lstm_quantizes_and_keeps_accuracy(lstm_sources, tmp_path, mode, run_stage, manifest):
    path = manifest(TEXT.format(name="digits-lstm-unrolled", mode=mode))
    result = run_stage(path)
    assert result.exit_code == 0, result.output
    report = result.report
    assert report["baseline"]["accuracy"] > 0.8
    fb = report["conversion"]["flatbuffer"]
    assert fb["weight_dtypes"]["INT8"] >= 2
    if mode == "dynamic":  # int8 weights, float activations; tensors under 1,024 values stay float
        assert report["candidate"]["size_bytes"] < 0.8 * report["baseline"]["size_bytes"]
    else:
        # full int8: activations too; on an unrolled 32-unit LSTM the per-op quantization
        # parameters of 8 unrolled steps cancel most of the weight saving (measured 0.96x)
        assert fb["activation_dtypes"]["INT8"] > fb["activation_dtypes"].get("FLOAT32", 0)
        assert report["candidate"]["size_bytes"] < report["baseline"]["size_bytes"]
    ops = report["conversion"]["flatbuffer"]["ops"]
    assert "FULLY_CONNECTED" in ops and not any(op.startswith("CUSTOM") for op in ops)
