"""The demo: a small real model (a CNN on scikit-learn's offline digits) logged to MLflow, then the
stage run on it with `manifests/examples/digits-int8.yaml`. Tests reuse the same training code."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEMO_MODEL_NAME = "digits-cnn"
DEMO_ALIAS = "champion"
EXAMPLE_MANIFEST = "digits-int8.yaml"


@dataclass
class DigitsData:
    train: tuple[np.ndarray, np.ndarray]
    calibration: tuple[np.ndarray, np.ndarray]
    evaluation: tuple[np.ndarray, np.ndarray]


def digits_data(seed: int = 0) -> DigitsData:
    """8x8 grey digits scaled to [0, 1], shuffled with `seed`: 1200 train (200 of them for
    calibration) and 597 held out for evaluation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    return DigitsData(train=(x[:1200], y[:1200]), calibration=(x[:200], y[:200]), evaluation=(x[1200:], y[1200:]))


def train_digits_cnn(data: DigitsData, *, epochs: int = 12, seed: int = 0):
    """A small CNN (~10k parameters) that reaches ~97% top-1 on held-out digits in seconds."""
    from pipeline_stage._tf import import_tf

    import_tf()
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((8, 8, 1), name="image"),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(10, activation="softmax", name="probabilities"),
    ], name="digits_cnn")
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(*data.train, epochs=epochs, batch_size=32, verbose=0)
    return model


def log_source_model(model, data: DigitsData, *, name: str = DEMO_MODEL_NAME, alias: str | None = DEMO_ALIAS,
                     experiment: str = "pipeline-stage-demo") -> dict[str, Any]:
    """Log `model` and its data (data/{train,calib,eval}.npz) to one run; register and alias it."""
    import mlflow
    from mlflow.models import infer_signature

    from pipeline_stage._tf import stdout_to_stderr

    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="train-digits-cnn") as run, tempfile.TemporaryDirectory() as tmp:
        for fname, (x, y) in (("train.npz", data.train), ("calib.npz", data.calibration), ("eval.npz", data.evaluation)):
            np.savez(Path(tmp) / fname, x=x, y=y)
            mlflow.log_artifact(str(Path(tmp) / fname), "data")
        x_eval, y_eval = data.evaluation
        acc = float(np.mean(model.predict(x_eval, verbose=0).argmax(-1) == y_eval))
        mlflow.log_metric("eval_accuracy", acc)
        signature = infer_signature(x_eval[:4], model.predict(x_eval[:4], verbose=0))
        with stdout_to_stderr():
            info = mlflow.tensorflow.log_model(model, name="model", signature=signature, registered_model_name=name)
        version = str(info.registered_model_version)
        client = mlflow.MlflowClient()
        if alias:
            client.set_registered_model_alias(name, alias, version)
    return {"run_id": run.info.run_id, "name": name, "version": version, "accuracy": acc,
            "uri": f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"}


def example_manifest(name: str = EXAMPLE_MANIFEST) -> Path:
    """Find an example manifest: $PIPELINE_STAGE_EXAMPLES, the source checkout, or the working directory."""
    candidates = []
    if os.environ.get("PIPELINE_STAGE_EXAMPLES"):
        candidates.append(Path(os.environ["PIPELINE_STAGE_EXAMPLES"]) / name)
    candidates += [Path(__file__).resolve().parents[1] / "manifests" / "examples" / name,
                   Path.cwd() / "manifests" / "examples" / name]
    for path in candidates:
        if path.is_file():
            return path
    from pipeline_stage.errors import InputError

    raise InputError(f"example manifest `{name}` not found (looked in: {', '.join(str(c.parent) for c in candidates)})",
                     hint="run from the source checkout or set PIPELINE_STAGE_EXAMPLES to manifests/examples")
