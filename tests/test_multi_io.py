"""A model is a signature: two named inputs -> two named outputs (a classifier head and a regression
head that plain int8 damages). Data arrays are named after the inputs, labels `y.<output>`; metrics
come per output and a gate sees the worst one; checked independently with the LiteRT interpreter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_manifest
from tests.helpers import invoke, read_report, versions_of

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
    return {"model": model, "folder": folder, "eval": evaluation}


def _manifest(tmp_path: Path, src: dict, chain: str, gates: str, *, evaluation: str = "eval.npz", extra: str = "", name="m.yaml"):
    folder = src["folder"]
    text = (
        f"model: {folder / 'two_heads.keras'}\ndata: {{calibration: {folder / 'calib.npz'}, evaluation: {folder / evaluation}}}\n"
        f"chain:\n{chain}gates:\n{gates}{extra}"
    )
    return write_manifest(tmp_path, text, name)


def _sqnr_per_output(tflite: bytes, src: dict) -> dict[str, float]:
    """Each output's SQNR against the Keras model, computed here with the LiteRT interpreter."""
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=tflite).get_signature_runner()
    ref = src["model"].predict(src["eval"], verbose=0)
    rows = len(src["eval"]["audio"])
    outs = [runner(**{k: v[i : i + 1] for k, v in src["eval"].items()}) for i in range(rows)]
    got = {o: np.concatenate([out[o] for out in outs]) for o in OUTPUTS}
    return {o: float(10 * np.log10(np.sum(ref[o] ** 2) / np.sum((ref[o] - got[o]) ** 2))) for o in OUTPUTS}


def test_several_inputs_and_outputs_end_to_end_with_metrics_per_output(two_heads, mlflow_server, tmp_path):
    path = _manifest(
        tmp_path,
        two_heads,
        "  - quantize: {mode: float16}\n",
        "  - {metric: accuracy.label, max_drop: 0.01}\n  - {metric: mae.level, max: 0.05}\n"
        "  - {metric: fidelity_sqnr_db, min: 30}\n",
        extra="evaluation: {metrics: [accuracy, mae, fidelity_sqnr_db, size_bytes]}\nregister: {name: two-heads, alias: ok}\n",
    )
    result = invoke("run", str(path), "--report", str(tmp_path / "r.json"), "--output", str(tmp_path / "m.tflite"))
    assert result.exit_code == 0, result.output
    report = read_report(tmp_path / "r.json")
    candidate = report["candidate"]
    assert {"accuracy.label", "mae.level", "fidelity_sqnr_db.label", "fidelity_sqnr_db.level"} <= set(candidate)
    assert "accuracy.level" not in candidate  # a regression output has no accuracy
    assert candidate["fidelity_sqnr_db"] == min(candidate["fidelity_sqnr_db.label"], candidate["fidelity_sqnr_db.level"])
    independent = _sqnr_per_output((tmp_path / "m.tflite").read_bytes(), two_heads)
    for o in OUTPUTS:
        # within 2%: at 70+ dB the error is float rounding, computed a little differently here
        assert candidate[f"fidelity_sqnr_db.{o}"] == pytest.approx(independent[o], rel=0.02)
    page = (tmp_path / "r.html").read_text()
    assert "alt='fidelity per output (SQNR against the baseline&#x27;s outputs)' src='data:image/png;base64," in page
    # the registered pyfunc takes both inputs by name and gives both outputs by name
    import mlflow

    loaded = mlflow.pyfunc.load_model(report["registered"]["uri"])
    out = loaded.predict({k: v[:5] for k, v in two_heads["eval"].items()})
    assert set(out) == set(OUTPUTS) and out["label"].shape == (5, 3) and out["level"].shape == (5, 1)


def test_int8_damage_to_one_output_fails_a_fidelity_gate_without_labels(two_heads, mlflow_server, tmp_path):
    path = _manifest(
        tmp_path,
        two_heads,
        "  - quantize: {mode: int8}\n",
        "  - {metric: fidelity_sqnr_db, min: 20}\n",
        evaluation="eval-x.npz",
        extra="register: {name: two-heads-int8, alias: never}\n",
    )
    result = invoke("run", str(path), "--report", str(tmp_path / "r.json"))
    assert result.exit_code == 3, result.output
    candidate = read_report(tmp_path / "r.json")["candidate"]
    assert candidate["fidelity_sqnr_db.level"] < 20 <= candidate["fidelity_sqnr_db.label"]
    # the message and the report say which output failed
    assert "gate failed: fidelity_sqnr_db min 20.0 (value " in result.stderr and "output `level`)" in result.stderr
    assert read_report(tmp_path / "r.json")["gates"][0]["worst_output"] == "level"
    assert "accuracy" not in candidate  # no labels: no accuracy by default
    assert versions_of("two-heads-int8") == []


def test_the_search_registers_a_chain_whose_every_output_passes(two_heads, mlflow_server, tmp_path):
    path = _manifest(
        tmp_path,
        two_heads,
        "  - quantize: {mode: int8}\n",
        "  - {metric: fidelity_sqnr_db, min: 20}\n",
        evaluation="eval-x.npz",
        extra="search:\n  strategy: candidates\n  objective: size_bytes\n  candidates:\n"
        "    - [{quantize: {mode: dynamic}}]\n    - [{quantize: {mode: float16}}]\n"
        "register: {name: two-heads-search, alias: best}\n",
    )
    result = invoke("run", str(path), "--report", str(tmp_path / "r.json"), "--output", str(tmp_path / "m.tflite"))
    assert result.exit_code == 0, result.output
    report = read_report(tmp_path / "r.json")
    statuses = {t["chain"]: t["status"] for t in report["search"]["trials"]}
    assert statuses["quantize(mode=int8)"] == "failed"
    assert all(v >= 20 for v in _sqnr_per_output((tmp_path / "m.tflite").read_bytes(), two_heads).values())
    assert report["registered"]["alias"] == "best"


def test_data_must_name_every_input_with_the_right_shape(two_heads, tmp_path):
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
        result = invoke("run", str(write_manifest(tmp_path, text, data + ".yaml")))
        assert result.exit_code == 2 and needle in result.stderr, result.output


def test_auto_search_falls_back_to_another_mode_when_int8_cannot_pass(two_heads, mlflow_server, tmp_path):
    """No int8 chain passes (the damage is in an activation's range); the `modes` move, a costlier
    alternative, is tried after the cheaper moves found nothing, and a passing mode is registered."""
    path = _manifest(
        tmp_path,
        two_heads,
        "  - quantize: {mode: int8}\n",
        "  - {metric: fidelity_sqnr_db, min: 20}\n",
        evaluation="eval-x.npz",
        extra="search: {strategy: auto, objective: size_bytes}\nregister: {name: two-heads-auto, alias: best}\n",
    )
    result = invoke("run", str(path), "--report", str(tmp_path / "r.json"), "--output", str(tmp_path / "m.tflite"))
    assert result.exit_code == 0, result.output
    search = read_report(tmp_path / "r.json")["search"]
    origins = [t["origin"] for t in search["trials"]]
    assert origins[0] == "as written" and {"mode dynamic", "mode float16", "mode int16x8"} <= set(origins)
    assert origins.index("mode dynamic") > origins.index("as written")
    winner = next(t for t in search["trials"] if t["index"] == search["winner"])
    assert winner["origin"].startswith("mode ")
    assert all(v >= 20 for v in _sqnr_per_output((tmp_path / "m.tflite").read_bytes(), two_heads).values())


def test_dynamic_height_and_width_take_the_data_shapes(mlflow_server, tmp_path):
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
    result = invoke(
        "run", str(write_manifest(tmp_path, text)), "--report", str(tmp_path / "r.json"), "--output", str(tmp_path / "m.tflite")
    )
    assert result.exit_code == 0, result.output
    report = read_report(tmp_path / "r.json")
    assert report["candidate"]["fidelity_sqnr_db"] >= 20 and report["candidate"]["latency_p50_ms"] > 0
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(tmp_path / "m.tflite"))
    assert list(interpreter.get_input_details()[0]["shape_signature"]) == [-1, -1, -1, 3]
