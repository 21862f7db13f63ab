"""A model is a signature: two named inputs -> two named outputs (a classifier head and a regression
head that plain int8 damages). Data arrays are named after the inputs, labels `y.<output>`; metrics
come per output and a gate sees the worst one; checked independently with the LiteRT interpreter."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import signature_outputs, sqnr_db

OUTPUTS = ("label", "level")


@pytest.fixture(scope="module")
def two_heads(tmp_path_factory) -> dict:
    """pipeline_stage.demo.build_two_heads: weights set so that plain int8 ruins `level`."""
    from pipeline_stage.demo import build_two_heads

    folder = tmp_path_factory.mktemp("two-heads")
    model, inputs = build_two_heads()
    model.save(folder / "two_heads.keras")
    calib, evaluation = inputs(200), inputs(300)
    truth = model.predict(evaluation, verbose=0)
    np.savez(folder / "calib.npz", **calib)
    np.savez(folder / "eval.npz", **evaluation, **{"y.label": truth["label"].argmax(-1), "y.level": truth["level"]})
    np.savez(folder / "eval-x.npz", **evaluation)
    return {"model": model, "folder": folder, "eval": evaluation, "model_path": str(folder / "two_heads.keras")}


def _sqnr_per_output(tflite: bytes, src: dict) -> dict[str, float]:
    """Each output's SQNR against the Keras model."""
    return sqnr_db(src["model"].predict(src["eval"], verbose=0), signature_outputs(tflite, src["eval"]))


def test_several_inputs_and_outputs_end_to_end_with_metrics_per_output(two_heads, mlflow_server, tmp_path, run_stage, manifest):
    path = manifest(
        model=two_heads["model_path"],
        data={"calibration": str(two_heads["folder"] / "calib.npz"), "evaluation": str(two_heads["folder"] / "eval.npz")},
        chain="  - quantize: {mode: float16}\n",
        gates="  - {metric: accuracy.label, max_drop: 0.01}\n  - {metric: mae.level, max: 0.05}\n"
        "  - {metric: fidelity_sqnr_db, min: 30}\n",
        extra="evaluation: {metrics: [accuracy, mae, fidelity_sqnr_db, size_bytes]}\nregister: {name: two-heads, alias: ok}\n",
    )
    result = run_stage(path)
    assert result.exit_code == 0, result.output
    report = result.report
    candidate = report["candidate"]
    assert {"accuracy.label", "mae.level", "fidelity_sqnr_db.label", "fidelity_sqnr_db.level"} <= set(candidate)
    assert "accuracy.level" not in candidate  # a regression output has no accuracy
    assert candidate["fidelity_sqnr_db"] == min(candidate["fidelity_sqnr_db.label"], candidate["fidelity_sqnr_db.level"])
    independent = _sqnr_per_output(result.model_bytes, two_heads)
    for o in OUTPUTS:
        # within 2%: at 70+ dB the error is float rounding, computed a little differently here
        assert candidate[f"fidelity_sqnr_db.{o}"] == pytest.approx(independent[o], rel=0.02)
    page = result.report_path.with_suffix(".html").read_text()
    assert "alt='fidelity per output (SQNR against the baseline&#x27;s outputs)' src='data:image/png;base64," in page
    # the registered pyfunc takes both inputs by name and gives both outputs by name
    import mlflow

    loaded = mlflow.pyfunc.load_model(report["registered"]["uri"])
    out = loaded.predict({k: v[:5] for k, v in two_heads["eval"].items()})
    assert set(out) == set(OUTPUTS) and out["label"].shape == (5, 3) and out["level"].shape == (5, 1)


def test_int8_damage_to_one_output_fails_a_fidelity_gate_without_labels(
    two_heads, mlflow_server, tmp_path, run_stage, versions_of, manifest
):
    path = manifest(
        model=two_heads["model_path"],
        data={"calibration": str(two_heads["folder"] / "calib.npz"), "evaluation": str(two_heads["folder"] / "eval-x.npz")},
        chain="  - quantize: {mode: int8}\n",
        gates="  - {metric: fidelity_sqnr_db, min: 20}\n",
        extra="register: {name: two-heads-int8, alias: never}\n",
    )
    result = run_stage(path)
    assert result.exit_code == 3, result.output
    candidate = result.report["candidate"]
    assert candidate["fidelity_sqnr_db.level"] < 20 <= candidate["fidelity_sqnr_db.label"]
    # the message and the report say which output failed
    assert "gate failed: fidelity_sqnr_db min 20.0 (value " in result.stderr and "output `level`)" in result.stderr
    assert result.report["gates"][0]["worst_output"] == "level"
    assert "accuracy" not in candidate  # no labels: no accuracy by default
    assert versions_of("two-heads-int8") == []


def test_the_search_registers_a_chain_whose_every_output_passes(two_heads, mlflow_server, tmp_path, run_stage, manifest):
    path = manifest(
        model=two_heads["model_path"],
        data={"calibration": str(two_heads["folder"] / "calib.npz"), "evaluation": str(two_heads["folder"] / "eval-x.npz")},
        chain="  - quantize: {mode: int8}\n",
        gates="  - {metric: fidelity_sqnr_db, min: 20}\n",
        extra="search:\n  strategy: candidates\n  objective: size_bytes\n  candidates:\n"
        "    - [{quantize: {mode: dynamic}}]\n    - [{quantize: {mode: float16}}]\n"
        "register: {name: two-heads-search, alias: best}\n",
    )
    result = run_stage(path)
    assert result.exit_code == 0, result.output
    report = result.report
    statuses = {t["chain"]: t["status"] for t in report["search"]["trials"]}
    assert statuses["quantize(mode=int8)"] == "failed"
    assert all(v >= 20 for v in _sqnr_per_output(result.model_bytes, two_heads).values())
    assert report["registered"]["alias"] == "best"


def test_litert_engine_calibrates_every_input_and_keeps_an_outputs_branch_in_float(
    two_heads, mlflow_server, tmp_path, run_stage, manifest
):
    """The LiteRT Quantizer on the two-input model, `level`'s own nodes kept float (no_quantize rules):
    the shared layers stay int8, the branch is float, and `level` recovers from ~0 dB (plain int8)."""
    path = manifest(
        model=two_heads["model_path"],
        data={"calibration": str(two_heads["folder"] / "calib.npz"), "evaluation": str(two_heads["folder"] / "eval-x.npz")},
        chain="  - quantize: {mode: int8, engine: litert, keep_float_outputs: [level]}\n",
        gates="  - {metric: fidelity_sqnr_db, min: 10}\n",
    )
    result = run_stage(path)
    assert result.exit_code == 0, result.output
    tflite = result.model_bytes
    assert all(v >= 10 for v in _sqnr_per_output(tflite, two_heads).values())
    from pipeline_stage import read_flatbuffer

    dense = {
        n.outputs[0].name.split("/")[1]: n.outputs[0].dtype
        for n in read_flatbuffer(tflite).nodes
        if n.op == "FULLY_CONNECTED" and "/" in n.outputs[0].name
    }
    assert dense["shared_1"] == dense["label_1"] == "INT8" and dense["wide_1"] == "FLOAT32", dense
    bad = manifest(
        model=two_heads["model_path"],
        data={"calibration": str(two_heads["folder"] / "calib.npz"), "evaluation": str(two_heads["folder"] / "eval-x.npz")},
        chain="  - quantize: {mode: int8, keep_float_outputs: [levle]}\n",
        gates="  - {metric: fidelity_sqnr_db, min: 20}\n",
        name="bad.yaml",
    )
    result = run_stage(bad)
    assert result.exit_code == 2 and "`levle`, not an output of the model" in result.stderr and "label, level" in result.stderr


def test_the_registered_pyfunc_has_a_predict_type_hint_mlflow_accepts():
    """MLflow prints a UserWarning asking for type hints when the pyfunc module is loaded (on every
    run that logs it, and wherever it is loaded) unless `predict` has one it accepts."""
    import subprocess
    import sys

    code = (
        "import warnings\nwarnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    import pipeline_stage.mlflow_io.pyfunc_model\n"
        "print([str(w.message) for w in seen if 'type hint' in str(w.message)])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out


def test_data_must_name_every_input_with_the_right_shape(two_heads, tmp_path, run_stage, manifest):
    folder = two_heads["folder"]
    np.savez(tmp_path / "only-audio.npz", audio=two_heads["eval"]["audio"])
    np.savez(tmp_path / "bad-shape.npz", audio=two_heads["eval"]["audio"], meta=np.zeros((300, 5), np.float32))
    for data, needle in (
        ("only-audio.npz", "no array for model input `meta`"),
        ("bad-shape.npz", "input `meta` data has samples of shape (5,), but the model takes (4,)"),
    ):
        text = (
            f"model: {folder / 'two_heads.keras'}\ndata: {{evaluation: {tmp_path / data}}}\nchain:\n  - quantize: {{mode: float16}}\n"
            "gates:\n  - {metric: fidelity_sqnr_db, min: 20}\n"
        )
        result = run_stage(manifest(text, name=data + ".yaml"))
        assert result.exit_code == 2 and needle in result.stderr, result.output


def test_auto_search_falls_back_to_another_mode_when_int8_cannot_pass(two_heads, mlflow_server, tmp_path, run_stage, manifest):
    """Without the move that keeps an output's nodes in float, no int8 chain passes (the damage is
    in an activation's range); the `modes` move, a costlier alternative, is tried after the cheaper
    moves found nothing, and a passing mode is registered."""
    path = manifest(
        model=two_heads["model_path"],
        data={"calibration": str(two_heads["folder"] / "calib.npz"), "evaluation": str(two_heads["folder"] / "eval-x.npz")},
        chain="  - quantize: {mode: int8}\n",
        gates="  - {metric: fidelity_sqnr_db, min: 20}\n",
        extra="search: {strategy: auto, objective: size_bytes, moves: [engine, keep_float_ops, keep_float_nodes, modes]}\n"
        "register: {name: two-heads-auto, alias: best}\n",
    )
    result = run_stage(path)
    assert result.exit_code == 0, result.output
    search = result.report["search"]
    origins = [t["origin"] for t in search["trials"]]
    assert origins[0] == "as written" and {"mode dynamic", "mode float16", "mode int16x8"} <= set(origins)
    assert origins.index("mode dynamic") > origins.index("as written")
    winner = next(t for t in search["trials"] if t["index"] == search["winner"])
    assert winner["origin"].startswith("mode ")
    assert all(v >= 20 for v in _sqnr_per_output(result.model_bytes, two_heads).values())


def test_dynamic_height_and_width_take_the_data_shapes(mlflow_server, tmp_path, run_stage, manifest):
    """A fully convolutional model with dynamic height and width: the data's 24x20 images decide the
    shapes the interpreter runs, and int8 is gated on per-pixel outputs without labels."""
    import keras

    rng = np.random.default_rng(1)
    image = keras.Input((None, None, 3), name="image")
    features = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(image)
    mask = keras.layers.Conv2D(2, 1, name="mask")(features)
    model = keras.Model(image, mask)
    model.save(tmp_path / "fcn.keras")
    x = rng.uniform(0, 1, (64, 24, 20, 3)).astype(np.float32)
    np.savez(tmp_path / "images.npz", x=x)
    text = (
        f"model: {tmp_path / 'fcn.keras'}\ndata: {{calibration: {tmp_path / 'images.npz'}, evaluation: {tmp_path / 'images.npz'}}}\n"
        "chain:\n  - quantize: {mode: int8}\ngates:\n  - {metric: fidelity_sqnr_db, min: 20}\n"
    )
    result = run_stage(manifest(text))
    assert result.exit_code == 0, result.output
    report = result.report
    assert report["candidate"]["fidelity_sqnr_db"] >= 20 and report["candidate"]["latency_p50_ms"] > 0
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(result.output_path))
    assert list(interpreter.get_input_details()[0]["shape_signature"]) == [-1, -1, -1, 3]


HEADS = ("scores", "boxes", "landmarks")


@pytest.fixture(scope="module")
def three_heads(tmp_path_factory) -> dict:
    """A `tf.Module` SavedModel, one input `image_features` -> three outputs (`scores`, `boxes`,
    `landmarks`, as a face detector's), weights set so that plain full int8 ruins `landmarks` only:
    its hidden layer has one channel a thousand times larger than the others, and full int8 gives
    that activation one scale, so the small channels that alone feed `landmarks` round to zero.
    Unlabelled data."""
    import tensorflow as tf

    rng = np.random.default_rng(3)

    def dense(n_in: int, n_out: int) -> tuple[tf.Variable, tf.Variable]:
        return tf.Variable(rng.normal(0, 0.5, (n_in, n_out)).astype(np.float32)), tf.Variable(
            rng.normal(0, 0.5, n_out).astype(np.float32)
        )

    class Heads(tf.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.scores, self.boxes = dense(12, 16), dense(16, 2), dense(16, 4)
            kernel, bias = rng.normal(0, 0.5, (16, 8)).astype(np.float32), rng.normal(0, 0.5, 8).astype(np.float32)
            kernel[:, 0] *= 1000.0
            bias[0] = 1000.0
            self.wide = tf.Variable(kernel), tf.Variable(bias)
            head = rng.normal(0, 0.5, (8, 10)).astype(np.float32)
            head[0] = 0.0
            self.landmarks = tf.Variable(head), tf.Variable(np.zeros(10, np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, 12], tf.float32, name="image_features")])
        def serve(self, image_features):
            def layer(x, weights, relu=False):
                y = tf.matmul(x, weights[0]) + weights[1]
                return tf.nn.relu(y) if relu else y

            shared = layer(image_features, self.shared, relu=True)
            return {
                "scores": tf.nn.softmax(layer(shared, self.scores)),
                "boxes": layer(shared, self.boxes),
                "landmarks": layer(layer(shared, self.wide), self.landmarks),
            }

    folder = tmp_path_factory.mktemp("three-heads")
    module = Heads()
    tf.saved_model.save(module, str(folder / "saved_model"), signatures={"serving_default": module.serve})
    calib, evaluation = rng.uniform(0, 1, (200, 12)).astype(np.float32), rng.uniform(0, 1, (300, 12)).astype(np.float32)
    np.savez(folder / "calib.npz", image_features=calib)
    np.savez(folder / "eval.npz", image_features=evaluation)
    reference = {k: v.numpy() for k, v in module.serve(tf.constant(evaluation)).items()}
    data = {"calibration": str(folder / "calib.npz"), "evaluation": str(folder / "eval.npz")}
    return {
        "folder": folder,
        "eval": evaluation,
        "reference": reference,
        "sections": {"model": str(folder / "saved_model"), "data": data},
    }


def _sqnr_three_heads(tflite: bytes, src: dict) -> dict[str, float]:
    """Each output's SQNR against the SavedModel's own outputs."""
    return sqnr_db(src["reference"], signature_outputs(tflite, {"image_features": src["eval"]}))


def test_three_outputs_without_labels_plain_int8_exits_3_naming_the_damaged_output(
    three_heads, mlflow_server, tmp_path, run_stage, versions_of, manifest
):
    path = manifest(
        **three_heads["sections"],
        chain=[{"quantize": {"mode": "int8"}}],
        gates=[{"metric": "fidelity_sqnr_db", "min": 20}],
        extra="register: {name: three-heads-int8, alias: never}\n",
    )
    result = run_stage(path)
    assert result.exit_code == 3, result.output
    independent = _sqnr_three_heads(result.model_bytes, three_heads)
    assert independent["landmarks"] < 20 <= min(independent["scores"], independent["boxes"])
    gate = result.report["gates"][0]
    assert gate["worst_output"] == "landmarks" and gate["failing_outputs"] == ["landmarks"]
    assert "output `landmarks`" in result.stderr
    assert versions_of("three-heads-int8") == []


def test_the_search_keeps_the_damaged_outputs_nodes_in_float_and_registers_int8(
    three_heads, mlflow_server, tmp_path, run_stage, versions_of, manifest
):
    """`auto` on the three-output SavedModel: the keep_float_outputs move keeps the nodes that feed
    only `landmarks` in float; the rest stays int8, and every output is at least 20 dB (checked here
    with the LiteRT interpreter against the SavedModel). With every move, the search would go on to
    the LiteRT Quantizer's recipes: on this 4.5 KB model the int8 result is no smaller than float."""
    path = manifest(
        **three_heads["sections"],
        chain=[{"quantize": {"mode": "int8"}}],
        gates=[{"metric": "fidelity_sqnr_db", "min": 20}],
        extra="search: {strategy: auto, objective: size_bytes, moves: [keep_float_outputs]}\nregister: {name: three-heads, alias: best}\n",
    )
    result = run_stage(path)
    assert result.exit_code == 0, result.output
    report = result.report
    winner = next(t for t in report["search"]["trials"] if t["index"] == report["search"]["winner"])
    assert winner["origin"] == "keep output's nodes in float: landmarks"
    assert "keep_float_outputs=['landmarks']" in winner["chain"]
    tflite = result.model_bytes
    assert all(v >= 20 for v in _sqnr_three_heads(tflite, three_heads).values())
    from pipeline_stage import read_flatbuffer

    weights = read_flatbuffer(tflite).constant_dtypes()
    assert weights["INT8"] >= 3 and weights["FLOAT32"] >= 2  # shared/scores/boxes int8; the landmarks branch float
    assert report["registered"]["alias"] == "best" and len(versions_of("three-heads")) == 1
