"""Broken manifests: each is refused with exit code 2 and one message naming file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline_stage import use_plugins
from tests.fake_plugins import Steps
from tests.figures import add
from tests.helpers import REPO

BAD = Path(__file__).parent / "manifests" / "bad"

# file -> (line the message must point at, or None; substrings the message must contain)
EXPECTED = {
    "malformed-yaml.yaml": (3, ["invalid YAML"]),
    "empty.yaml": (None, ["the manifest is empty"]),
    "not-a-mapping.yaml": (1, ["must be a mapping"]),
    "unknown-step.yaml": (4, ["unknown step `quantise`", "installed steps:", "did you mean `quantize`?"]),
    "wrong-param-type.yaml": (6, ["chain[0].quantize.calibration_samples", "valid integer", "'many'"]),
    "bad-enum.yaml": (4, ["chain[0].quantize.mode", "'int3'", "'int8'"]),
    "unknown-param.yaml": (4, ["chain[0].quantize.mdoe", "unknown field for step `quantize`", "did you mean `mode`?"]),
    "unknown-top-field.yaml": (4, ["`gate`", "unknown field", "did you mean `gates`?"]),
    "out-of-phase-order.yaml": (
        4,
        ["`identity_model` (phase model) comes after `quantize` (phase convert)", "model -> convert -> tflite"],
    ),
    "tflite-before-convert.yaml": (4, ["`quantize` (phase convert) comes after `stamp` (phase tflite)"]),
    "missing-calibration-data.yaml": (2, ["data.calibration", "required by quantize"]),
    "missing-evaluation-data.yaml": (None, ["data.evaluation", "required by the metrics and gates"]),
    "unknown-metric-gate.yaml": (6, ["gates[0].metric", "unknown metric `acuracy`", "did you mean `accuracy`?"]),
    "unknown-per-step-metric.yaml": (5, ["evaluation.per_step[1]", "unknown metric `latency_p99`"]),
    "gate-two-rules.yaml": (6, ["gates[0]", "exactly one rule", "max_drop, min"]),
    "gate-no-rule.yaml": (6, ["gates[0]", "exactly one rule", "none"]),
    "gate-negative-drop.yaml": (6, ["gates[0].max_drop", "greater than or equal to 0"]),
    "bad-model-uri.yaml": (1, ["`model`", "models:/<name>@<alias>"]),
    "no-model.yaml": (None, ["no model given", "--model-uri"]),
    "alias-without-gates.yaml": (6, ["register.alias", "no gates"]),
    "bad-register-name.yaml": (5, ["register.name", "pattern"]),
    "duplicate-key.yaml": (4, ["duplicate key `chain`"]),
    "chain-not-a-list.yaml": (2, ["`chain`", "valid list"]),
    "chain-item-two-keys.yaml": (3, ["chain[0]", "one key"]),
    "params-not-a-mapping.yaml": (3, ["params of step `quantize` must be a mapping"]),
    "io-does-not-fit-mode.yaml": (3, ["io `int8` does not fit mode `float16`"]),
    "bad-on-failure.yaml": (4, ["register.on_failure", "'skip' or 'register'"]),
    "missing-chain.yaml": (None, ["`chain`", "Field required"]),
    "tab-indentation.yaml": (3, ["invalid YAML"]),
    "unknown-data-field.yaml": (3, ["data.calibraton", "did you mean `calibration`?"]),
    "data-not-a-mapping.yaml": (2, ["`data`", "valid dictionary"]),
    "latency-runs-zero.yaml": (5, ["evaluation.latency_runs", "greater than or equal to 5"]),
    "batch-size-string.yaml": (5, ["evaluation.batch_size", "valid integer", "'big'"]),
    "register-without-name.yaml": (4, ["register.name", "Field required"]),
    "bad-alias.yaml": (9, ["register.alias", "pattern"]),
    "empty-experiment.yaml": (4, ["`experiment`", "at least 1 character"]),
    "gates-not-a-list.yaml": (4, ["`gates`", "valid list"]),
    "gate-without-metric.yaml": (5, ["gates[0].metric", "Field required"]),
    "relative-drop-above-one.yaml": (6, ["gates[0].max_relative_drop", "less than or equal to 1"]),
    "ratio-zero.yaml": (5, ["gates[0].max_ratio", "greater than 0"]),
    "unknown-conversion-option.yaml": (
        5,
        ["conversion.allow_flex", "unknown field", "known fields: allow_select_tf_ops, allow_custom_ops"],
    ),
    "bad-runs-uri.yaml": (1, ["`model`", "runs:/<run_id>/<artifact path>"]),
    "empty-model.yaml": (1, ["`model`", "empty"]),
    "python-tag.yaml": (1, ["invalid YAML", "python/object/apply"]),
    "billion-laughs.yaml": (None, ["expands to more than 100,000 values"]),
    "calibration-samples-negative.yaml": (4, ["chain[0].quantize.calibration_samples", "greater than or equal to 1"]),
    "io-int16-with-int8.yaml": (4, ["io `int16` does not fit mode `int8`"]),
    "step-name-not-a-string.yaml": (3, ["chain[0]", "one key"]),
    "list-at-top-field.yaml": (1, ["`model`", "valid string"]),
    "search-candidates-empty.yaml": (7, ["`search.candidates`", "at least one chain"]),
    "search-auto-without-int8.yaml": (7, ["`search.strategy`", "quantize: {mode: int8}"]),
    "search-unknown-objective.yaml": (8, ["`search.objective[0]`", "latency_p99_ms", "did you mean `latency_p50_ms`"]),
    "search-candidate-bad-step.yaml": (9, ["`search.candidates[0][1]`", "unknown step `quantise`", "did you mean `quantize`"]),
    "prune-without-training-data.yaml": (2, ["`data.training`", "required by prune"]),
    "qat-with-litert-engine.yaml": (
        3,
        ["chain[0].quantize", "engine litert offers modes dynamic, int8, float16, int16x8, weight_only, not `qat`"],
    ),
    "weight-only-on-converter.yaml": (3, ["chain[0].quantize", "mode weight_only is the LiteRT Quantizer's", "engine: litert"]),
    "converter-on-tflite-source.yaml": (
        3,
        ["chain[0].quantize", "the converter engine needs the TensorFlow model", "audio-tagger.tflite", "leave `engine` at auto"],
    ),
    "qat-on-tflite-source.yaml": (3, ["chain[0].quantize", "quantization-aware training fine-tunes the Keras model"]),
    "blockwise-weight-only.yaml": (3, ["chain[0].quantize", "block_size applies to mode dynamic with weight_bits 4"]),
    "recipe-file-missing.yaml": (3, ["chain[0].quantize", "recipe file `no-such-recipe.json` does not exist"]),
    "algorithm-with-float16.yaml": (
        3,
        ["chain[0].quantize", "algorithm `gptq` applies to modes dynamic, int8, int16x8, weight_only"],
    ),
    "per-tensor-float16.yaml": (
        3,
        ["chain[0].quantize", "per_channel: false applies to modes dynamic, int8, int16x8, weight_only, not `float16`"],
    ),
}


@pytest.fixture
def host_with_test_plugins(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tests" / "plugin_pkg"))
    import pipeline_stage_stamp

    with use_plugins((Steps(), "fake-steps"), (pipeline_stage_stamp, "stamp")) as host:
        yield host


def test_corpus_is_complete():
    assert sorted(p.name for p in BAD.glob("*.yaml")) == sorted(EXPECTED)
    assert len(EXPECTED) >= 40


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_manifest_is_refused_clearly(name, host_with_test_plugins, invoke):
    line, needles = EXPECTED[name]
    path = BAD / name
    result = invoke("validate", str(path))
    add("bad inputs tried: manifest corpus")
    assert result.exit_code == 2, result.output
    message = result.stderr
    assert message.startswith("error: ") and "Traceback" not in message
    assert str(path) in message
    if line is not None:
        assert f"{path}:{line}:" in message, message
    for needle in needles:
        assert needle in message, message


def test_missing_manifest_file(tmp_path, invoke):
    result = invoke("validate", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2
    assert "nope.yaml: file not found" in result.stderr


def test_model_uri_flag_is_checked_too(tmp_path, invoke):
    path = tmp_path / "m.yaml"
    path.write_text("chain:\n  - quantize: {mode: dynamic}\n")
    result = invoke("validate", str(path), "--model-uri", "models:/only-a-name")
    assert result.exit_code == 2 and "--model-uri" in result.stderr
    assert invoke("validate", str(path), "--model-uri", "models:/digits/3").exit_code == 0


def test_examples_validate(host_with_test_plugins, invoke):
    for path in sorted((REPO / "manifests" / "examples").glob("*.yaml")):
        result = invoke("validate", str(path))
        assert result.exit_code == 0, (path, result.output)
