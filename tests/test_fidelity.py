"""Gates that need no labels: fidelity of the candidate's outputs to the baseline's on the same
inputs (SQNR, cosine, top-1 agreement), unlabelled evaluation data, and measurements on real inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline_stage.contract.metrics import Evaluation
from pipeline_stage_plugins.metrics import FidelityCosine, FidelitySqnr, Top1Agreement


def _evaluation(candidate: np.ndarray, reference: np.ndarray) -> Evaluation:
    return Evaluation(
        model_bytes=b"",
        x=np.zeros((len(candidate), 1)),
        labels=None,
        predict=lambda x: candidate,
        latencies=lambda: np.zeros(1),
        reference=lambda: reference,
    )


def test_fidelity_metrics_on_given_outputs():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(200, 10)).astype(np.float32)
    noise = rng.normal(size=reference.shape).astype(np.float32)
    # noise at a tenth of the signal's amplitude is 20 dB, at a hundredth 40 dB
    for scale, db in ((0.1, 20.0), (0.01, 40.0)):
        assert FidelitySqnr().compute(_evaluation(reference + scale * noise, reference)) == pytest.approx(db, abs=0.5)
    assert FidelitySqnr().compute(_evaluation(reference, reference)) > 80  # identical: large, finite
    assert FidelityCosine().compute(_evaluation(reference, reference)) == pytest.approx(1.0)
    assert FidelityCosine().compute(_evaluation(-reference, reference)) == pytest.approx(-1.0)
    flipped = reference.copy()
    flipped[:50] = -flipped[:50]  # a quarter of the samples now pick another class
    assert Top1Agreement().compute(_evaluation(flipped, reference)) == pytest.approx(0.75, abs=0.02)
    with pytest.raises(ValueError, match="cannot be compared"):
        FidelitySqnr().compute(_evaluation(reference[:, :5], reference))
    with pytest.raises(ValueError, match="classification output"):
        Top1Agreement().compute(_evaluation(reference[:, :1], reference[:, :1]))


def _unlabelled(tmp_path: Path, digits_data) -> tuple[Path, Path]:
    calib, evaluation = tmp_path / "calib.npz", tmp_path / "eval-x.npz"
    np.savez(calib, x=digits_data.calibration[0])
    np.savez(evaluation, x=digits_data.evaluation[0])
    return calib, evaluation


def test_unlabelled_data_and_a_fidelity_gate(digits_source, digits_model, digits_data, tmp_path, run_stage, manifest):
    """No labels anywhere: the default metrics are fidelity, size and latency, and a fidelity gate
    decides. The stage's SQNR matches one computed here with the LiteRT interpreter."""
    from ai_edge_litert.interpreter import Interpreter

    calib, evaluation = _unlabelled(tmp_path, digits_data)
    text = (
        f"model: models:/digits-cnn@champion\ndata: {{calibration: {calib}, evaluation: {evaluation}}}\n"
        "chain:\n  - quantize: {mode: int8}\ngates:\n  - {metric: fidelity_sqnr_db, min: 15}\n"
        "register: {name: digits-fidelity, alias: unlabelled-ok}\n"
    )
    path = manifest(text)
    result = run_stage(path)
    assert result.exit_code == 0, result.output
    report = result.report
    assert set(report["candidate"]) == {"fidelity_sqnr_db", "size_bytes", "latency_p50_ms"}
    assert report["baseline_tflite"]["fidelity_sqnr_db"] > 60  # the float conversion is the Keras model
    interpreter = Interpreter(model_path=str(result.output_path))
    runner = interpreter.get_signature_runner()
    x = digits_data.evaluation[0].astype(np.float32)
    out = np.concatenate(
        [next(iter(runner(**{next(iter(runner.get_input_details())): x[i : i + 1]}).values())) for i in range(len(x))]
    )
    ref = digits_model.predict(x, verbose=0)
    sqnr = 10 * np.log10(np.sum(ref**2) / np.sum((ref - out) ** 2))
    assert report["candidate"]["fidelity_sqnr_db"] == pytest.approx(sqnr, abs=0.5)
    assert report["registered"]["alias"] == "unlabelled-ok"


def test_accuracy_without_labels_is_refused_before_any_work(digits_data, tmp_path, manifest, invoke):
    calib, evaluation = _unlabelled(tmp_path, digits_data)
    text = (
        f"model: models:/digits-cnn@champion\ndata: {{calibration: {calib}, evaluation: {evaluation}}}\n"
        "chain:\n  - quantize: {mode: int8}\ngates:\n  - {metric: accuracy, max_drop: 0.01}\n"
    )
    result = invoke("validate", str(manifest(text)))
    assert result.exit_code == 2
    assert "`data.evaluation`" in result.stderr and "has no labels `y`, but `accuracy` need them" in result.stderr
    assert "fix: " in result.stderr and "fidelity_sqnr_db" in result.stderr


def test_latency_needs_real_inputs(tmp_path, manifest, invoke):
    text = "model: models:/digits-cnn@champion\nchain:\n  - quantize: {mode: dynamic}\nevaluation: {metrics: [latency_p50_ms]}\n"
    result = invoke("validate", str(manifest(text)))
    assert result.exit_code == 2 and "runs the model on real inputs, but the manifest gives no data" in result.stderr


def test_latency_is_timed_on_calibration_data_without_evaluation_data(digits_source, digits_data, tmp_path, run_stage, manifest):
    calib, _ = _unlabelled(tmp_path, digits_data)
    text = (
        f"model: models:/digits-cnn@champion\ndata: {{calibration: {calib}}}\nchain:\n  - quantize: {{mode: int8}}\n"
        "gates:\n  - {metric: size_bytes, max_ratio: 0.5}\n"
    )
    result = run_stage(manifest(text))
    assert result.exit_code == 0, result.output
    report = result.report
    assert set(report["candidate"]) == {"size_bytes", "latency_p50_ms"} and report["candidate"]["latency_p50_ms"] > 0


def test_a_fidelity_gate_catches_the_int8_collapse_without_labels(collapse_source, tmp_path, run_stage, manifest, versions_of):
    """Plain int8 on the BN-after-ReLU model: a fidelity gate fails it (exit 3), nothing is registered."""
    text = (
        "model: models:/digits-bn-raw@champion\n"
        "data: {calibration: 'runs:/${source.run_id}/data/calib.npz', evaluation: 'runs:/${source.run_id}/data/eval.npz'}\n"
        "chain:\n  - quantize: {mode: int8}\nevaluation: {metrics: [fidelity_sqnr_db, top1_agreement, size_bytes]}\n"
        "gates:\n  - {metric: fidelity_sqnr_db, min: 20}\nregister: {name: digits-bn-fidelity, alias: never}\n"
    )
    result = run_stage(manifest(text))
    assert result.exit_code == 3, result.output
    report = result.report
    assert report["candidate"]["fidelity_sqnr_db"] < 20 and report["candidate"]["top1_agreement"] < 0.9
    assert "gate failed: fidelity_sqnr_db min 20.0" in result.stderr
    assert versions_of("digits-bn-fidelity") == []
