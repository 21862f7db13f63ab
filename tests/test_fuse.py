"""`fuse`: BatchNorm folding that is exact, removes the MUL+ADD the converter leaves for BN after
ReLU, and leaves alone (saying why) what it cannot fold exactly."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline_stage.contract.errors import InputError
from pipeline_stage.contract.steps import StepContext


def _no_data(name):
    raise InputError(f"`data.{name}` is needed but not given in the manifest")  # what the stage's context raises


def _fuse(model, **params):
    from pipeline_stage_plugins.fuse import Fuse, FuseParams

    ctx = StepContext(workdir=None, load_data=_no_data)
    return Fuse(FuseParams(**params)).apply(model, ctx), ctx.notes


@pytest.fixture(scope="session")
def bn_after_relu_source(mlflow_server, digits_data):
    """A digits CNN with Conv-ReLU-BN blocks (BN after the activation), trained on real data."""
    import keras

    from pipeline_stage.demo import log_source_model

    keras.utils.set_random_seed(1)
    bn = lambda: keras.layers.BatchNormalization(momentum=0.9)  # noqa: E731 - converges on 1200 images
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            bn(),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, padding="valid"),
            keras.layers.ReLU(),
            bn(),
            keras.layers.Flatten(),
            keras.layers.Dense(32),
            bn(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(*digits_data.train, epochs=12, batch_size=32, verbose=0)
    return log_source_model(model, digits_data, name="digits-bn-after-relu", alias="champion"), model


def test_fuse_then_int8_through_the_stage(bn_after_relu_source, tmp_path, run_stage, manifest):
    text = (
        "model: models:/digits-bn-after-relu@champion\n"
        "data: {calibration: 'runs:/${source.run_id}/data/calib.npz', evaluation: 'runs:/${source.run_id}/data/eval.npz'}\n"
        "chain:\n  - fuse: {}\n  - quantize: {mode: int8}\n"
        "evaluation: {per_step: [accuracy, size_bytes]}\n"
        "gates:\n  - {metric: accuracy, max_drop: 0.01}\n"
    )
    result = run_stage(manifest(text))
    assert result.exit_code == 0, result.output
    report = result.report
    fuse = report["steps"][0]
    assert fuse["phase"] == "model"
    assert fuse["notes"]["scale_backward_shift_forward"] and fuse["notes"]["folded_into_previous"]
    assert fuse["notes"]["left_alone"] == [] and fuse["notes"]["batchnorm_layers_after"] == 0
    assert fuse["notes"]["max_abs_output_difference"] < 1e-4
    assert fuse["metrics"]["accuracy"] == pytest.approx(report["baseline"]["accuracy"], abs=1e-9)  # exact
    before, after = report["baseline_flatbuffer"]["ops"], report["conversion"]["flatbuffer"]["ops"]
    assert before["MUL"] >= 2 and before["ADD"] >= 2  # what the converter leaves for BN after ReLU
    assert "MUL" not in after and "ADD" not in after


def test_bn_cases_that_cannot_fold_exactly_are_left_and_explained():
    import keras

    def model(*layers):
        m = keras.Sequential([keras.Input((8, 8, 1)), *layers])
        for layer in m.layers:  # give BN non-trivial statistics
            if isinstance(layer, keras.layers.BatchNormalization):
                n = layer.moving_mean.shape[0]
                layer.set_weights([np.linspace(0.5, 2, n), np.linspace(-1, 1, n), np.linspace(0, 1, n), np.linspace(1, 3, n)])
        return m

    relu6 = model(
        keras.layers.Conv2D(4, 3),
        keras.layers.ReLU(max_value=6),
        keras.layers.BatchNormalization(),
        keras.layers.Flatten(),
        keras.layers.Dense(2),
    )
    same = model(
        keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.BatchNormalization(), keras.layers.Conv2D(4, 3, padding="same")
    )
    negative = model(
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.BatchNormalization(),
        keras.layers.Flatten(),
        keras.layers.Dense(2),
    )
    negative.layers[1].set_weights([np.array([1.0, -1.0, 1.0, 1.0]), np.zeros(4), np.zeros(4), np.ones(4)])
    reasons = {}
    for name, m in (("relu6", relu6), ("negative", negative)):
        fused, notes = _fuse(m)
        assert fused is m and len(notes["left_alone"]) == 1
        reasons[name] = notes["left_alone"][0]["reason"]
    assert "not positively homogeneous" in reasons["relu6"]
    assert "not positive" in reasons["negative"]
    # A shift does not pass zero padding: the scale still moves backward, the BN keeps only the shift.
    fused, notes = _fuse(same)
    assert not notes["left_alone"] and "'same'" in notes["scale_backward_shift_kept"][0]["reason"]
    bn = next(layer for layer in fused.layers if isinstance(layer, keras.layers.BatchNormalization))
    gamma, _, mean, _ = bn.get_weights()
    assert np.allclose(gamma, 1) and np.allclose(mean, 0)

    inp = keras.Input((8, 8, 1))
    a = keras.layers.Conv2D(4, 3, activation="relu")(inp)
    branchy = keras.Model(inp, keras.layers.Add()([keras.layers.BatchNormalization()(a), a]))
    _, notes = _fuse(branchy)
    assert "whose output only it uses" in notes["left_alone"][0]["reason"]  # the Add also reads the ReLU output


def test_fold_into_previous_and_through_pooling_is_exact():
    import keras

    keras.utils.set_random_seed(3)
    m = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(6, 3, use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.LeakyReLU(0.1),
            keras.layers.BatchNormalization(),
            keras.layers.AveragePooling2D(2),
            keras.layers.Dropout(0.3),
            keras.layers.Conv2D(5, 1),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )
    for layer in m.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([np.linspace(0.5, 2, 6), np.linspace(-1, 1, 6), np.linspace(-0.3, 0.4, 6), np.linspace(0.5, 3, 6)])
    fused, notes = _fuse(m)
    assert notes["folded_into_previous"] and notes["scale_backward_shift_forward"] and not notes["left_alone"]
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in fused.layers)
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype(np.float32)
    assert np.max(np.abs(m.predict(x, verbose=0) - fused.predict(x, verbose=0))) < 1e-4


COLLAPSE = (
    "model: models:/digits-bn-raw@champion\n"
    "data: {calibration: 'runs:/${source.run_id}/data/calib.npz', evaluation: 'runs:/${source.run_id}/data/eval.npz'}\n"
    "chain:\n%s"
    "evaluation: {metrics: [accuracy, size_bytes]}\n"
    "gates:\n  - {metric: accuracy, max_drop: 0.01}\n"
)


def test_fuse_rescues_int8_where_plain_int8_collapses(collapse_source, tmp_path, run_stage, manifest):
    """The issue's case: BN after ReLU on real data; plain int8 fails the gate, fuse + int8 passes."""
    plain = run_stage(manifest(COLLAPSE % "  - quantize: {mode: int8}\n", name="plain.yaml"))
    assert plain.exit_code == 3, plain.output
    plain_report = plain.report
    keras_acc = plain_report["baseline"]["accuracy"]
    assert keras_acc > 0.95
    assert plain_report["candidate"]["accuracy"] < keras_acc - 0.1  # collapses, not a rounding loss

    fused = run_stage(manifest(COLLAPSE % "  - fuse: {}\n  - quantize: {mode: int8}\n", name="fused.yaml"))
    assert fused.exit_code == 0, fused.output
    report = fused.report
    assert report["candidate"]["accuracy"] >= keras_acc - 0.01
    notes = report["steps"][0]["notes"]
    # The first BN's next conv pads with zeros: its scale moves backward, its shift stays as an add.
    assert [n["layer"] for n in notes["scale_backward_shift_kept"]] and notes["scale_backward_shift_forward"]
    assert notes["max_abs_output_difference"] < 1e-3
    assert report["conversion"]["flatbuffer"]["weight_dtypes"] and "INT8" in str(
        report["conversion"]["flatbuffer"]["activation_dtypes"]
    )


def test_cross_layer_equalization_is_exact_and_balances_channels():
    import keras

    keras.utils.set_random_seed(5)
    m = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(6, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    k, b = m.layers[0].get_weights()
    m.layers[0].set_weights([k * np.array([100.0, 0.01, 1, 5, 0.2, 1]), b])  # channel ranges 10,000x apart
    fused, notes = _fuse(m, equalize=True)
    eq = {tuple(e["layers"]): e for e in notes["equalized"]}
    first = eq[(m.layers[0].name, m.layers[2].name)]
    assert first["channel_range_spread_before"] > 1000 and first["channel_range_spread_after"] < 100
    assert (m.layers[2].name, m.layers[4].name) in eq  # through Flatten into Dense
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype(np.float32)
    ref = m.predict(x, verbose=0)
    assert np.max(np.abs(ref - fused.predict(x, verbose=0))) < 1e-4 * max(1.0, np.abs(ref).max())
