"""Bad models (corrupt, unconvertible ops, custom layers, Lambda code) and the security rules:
safe YAML, safe Keras loading, no pickle, no path escape, no secrets in outputs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np

from tests.figures import add

ACME_PLUGIN = textwrap.dedent('''
    """An in-house plugin that supplies the custom layer its team's models use."""
    import keras
    from pipeline_stage import hookimpl

    @keras.saving.register_keras_serializable(package="acme")
    class Scale(keras.layers.Layer):
        def __init__(self, factor=2.0, **kwargs):
            super().__init__(**kwargs)
            self.factor = factor

        def call(self, x):
            return x * self.factor

        def get_config(self):
            return {**super().get_config(), "factor": self.factor}

    @hookimpl
    def register_keras_objects(register):
        register("acme>Scale", Scale)
''')


def _site_with_plugin(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "pipeline_stage_acme.py").write_text(ACME_PLUGIN)
    info = root / "pipeline_stage_acme-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pipeline-stage-acme\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[pipeline_stage]\nacme = pipeline_stage_acme\n")
    return root


def test_custom_layer_needs_a_plugin_and_works_with_one(tmp_path, digits_data, manifest, run_cli):
    add("bad inputs tried: models and data")
    site = _site_with_plugin(tmp_path / "site")
    x, y = digits_data.evaluation
    np.savez(tmp_path / "eval.npz", x=x, y=y)
    build = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(site)!r})
        import keras, numpy as np
        from pipeline_stage_acme import Scale
        m = keras.Sequential([keras.Input((8, 8, 1)), Scale(0.5), keras.layers.Flatten(), keras.layers.Dense(10, activation="softmax")])
        m.save({str(tmp_path / "custom.keras")!r})
    """)
    subprocess.run([sys.executable, "-c", build], check=True, capture_output=True)
    path = manifest(
        f"model: {tmp_path / 'custom.keras'}\ndata: {{evaluation: eval.npz}}\nchain:\n  - quantize: {{mode: float16}}\n"
    )
    env = {"PIPELINE_STAGE_DISABLE_PLUGINS": ""}
    missing = run_cli("run", str(path), "--tracking-uri", f"sqlite:///{tmp_path}/m.db", env=env)
    assert missing.returncode == 2, missing.stderr[-2000:]
    assert "custom layer or object" in missing.stderr and "register_keras_objects" in missing.stderr
    ok = run_cli("run", str(path), "--tracking-uri", f"sqlite:///{tmp_path}/m.db", env={"PYTHONPATH": str(site)})
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_lambda_layer_is_refused_unless_explicitly_allowed(tmp_path, mlflow_server, run_stage, manifest):
    add("bad inputs tried: models and data")
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda t: t * 2.0), keras.layers.Dense(2)])
    model.save(tmp_path / "lambda.keras")
    text = f"model: {tmp_path / 'lambda.keras'}\nchain: []\n"
    refused = run_stage(manifest(text))
    assert refused.exit_code == 2
    assert "Lambda" in refused.stderr and "allow_unsafe_deserialization: true" in refused.stderr
    allowed = run_stage(manifest(text + "allow_unsafe_deserialization: true\n", name="ok.yaml"))
    assert allowed.exit_code == 0, allowed.output


def test_corrupt_model_artifact(tmp_path, mlflow_server, run_stage, manifest, versions_of):
    add("bad inputs tried: models and data")
    with mlflow.start_run() as run:
        (tmp_path / "model.keras").write_bytes(b"PK\x03\x04 this is not a keras archive")
        mlflow.log_artifact(str(tmp_path / "model.keras"), "model")
    text = f"model: runs:/{run.info.run_id}/model\nchain: []\nregister: {{name: digits-corrupt}}\n"
    result = run_stage(manifest(text))
    assert result.exit_code == 2, result.output
    assert "could not be loaded (model.keras)" in result.stderr and "corrupt" in result.stderr
    assert versions_of("digits-corrupt") == []


def test_unconvertible_ops_are_named_and_select_ops_can_be_allowed(tmp_path, mlflow_server, run_stage, manifest):
    add("bad inputs tried: models and data")
    import tensorflow as tf

    class Model(tf.Module):
        def __init__(self):
            self.w = tf.Variable(np.ones((4, 2), np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, 4, 4], tf.float32)])
        def serve(self, x):
            return {"y": tf.reshape(tf.linalg.inv(x + 4.0 * tf.eye(4)), [-1, 16])}

    module = Model()
    tf.saved_model.save(module, str(tmp_path / "sm"), signatures={"serving_default": module.serve})
    text = f"model: {tmp_path / 'sm'}\nchain: []\nregister: {{name: digits-erfinv}}\n"
    refused = run_stage(manifest(text))
    assert refused.exit_code == 2, refused.output
    assert "TFLite cannot convert these ops with builtins: tf.MatrixInverse" in refused.stderr
    assert "allow_select_tf_ops: true" in refused.stderr
    # allowed: the flatbuffer carries a Flex op; the LiteRT interpreter cannot run it, so the stage
    # says so for metrics that need a run, and measures what it can
    allowed = text + "conversion: {allow_select_tf_ops: true}\n"
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).uniform(size=(8, 4, 4)).astype(np.float32))
    with_data = allowed + f"data: {{evaluation: {tmp_path / 'x.npz'}}}\n"
    cannot_run = run_stage(manifest(with_data, name="flex.yaml"))
    assert cannot_run.exit_code == 2 and "contains TF Select ops (FlexMatrixInverse)" in cannot_run.stderr, cannot_run.output
    sized = manifest(allowed + "evaluation: {metrics: [size_bytes], per_step: []}\n", name="ok.yaml")
    result = run_stage(sized)
    assert result.exit_code == 0, result.output
    assert "CUSTOM:FlexMatrixInverse" in result.report["conversion"]["flatbuffer"]["ops"]


def test_yaml_python_tags_are_refused_not_executed(tmp_path, manifest, invoke):
    marker = tmp_path / "pwned"
    text = f"model: !!python/object/apply:os.system ['touch {marker}']\nchain: []\n"
    result = invoke("validate", str(manifest(text)))
    assert result.exit_code == 2 and "invalid YAML" in result.stderr
    assert not marker.exists()


def test_pickled_data_is_refused(tmp_path, digits_source, run_stage, manifest):
    add("bad inputs tried: models and data")
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}] * 3, dtype=object), y=np.zeros(3))
    text = f"model: models:/digits-cnn@champion\ndata: {{evaluation: {tmp_path / 'objects.npz'}}}\nchain: []\n"
    result = run_stage(manifest(text))
    assert result.exit_code == 2 and "not a readable .npz" in result.stderr


def test_data_uri_cannot_escape_its_download_folder(tmp_path, digits_source, run_stage, manifest):
    add("bad inputs tried: models and data")
    text = (
        "model: models:/digits-cnn@champion\n"
        "data: {evaluation: 'runs:/${source.run_id}/../../../../../../etc/passwd'}\nchain: []\n"
    )
    result = run_stage(manifest(text))
    assert result.exit_code == 2, result.output
    assert Path("/etc/passwd").read_text().splitlines()[0] not in result.output


def test_secrets_never_reach_params_tags_reports_or_logs(tmp_path, digits_source, mlflow_server, monkeypatch, manifest, run_cli):
    secret = "s3cr3t-Passw0rd"
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-" + secret)
    uri = mlflow_server.replace("http://", f"http://alice:{secret}@")
    text = (
        "model: models:/digits-cnn@champion\n"
        "data: {evaluation: 'runs:/${source.run_id}/data/eval.npz'}\n"
        "chain:\n  - quantize: {mode: dynamic}\n"
        "gates:\n  - {metric: accuracy, max_drop: 0.05}\nregister: {name: digits-secret, alias: ok}\n"
    )
    result = run_cli("run", str(manifest(text)), "--tracking-uri", uri, "--report", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    report_text = (tmp_path / "r.json").read_text() + (tmp_path / "r.md").read_text()
    client = mlflow.MlflowClient()
    report = json.loads((tmp_path / "r.json").read_text())
    run = client.get_run(report["run_id"])
    version = client.get_model_version("digits-secret", report["registered"]["version"])
    haystacks = [
        result.stdout,
        result.stderr,
        report_text,
        json.dumps(run.data.params),
        json.dumps(run.data.tags),
        json.dumps(version.tags),
    ]
    assert not [h for h in haystacks if secret in h]
    assert "***" in report["tracking_uri"]
