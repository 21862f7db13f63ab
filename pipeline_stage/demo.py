"""The demo: a small real model (a CNN on scikit-learn's offline digits) logged to MLflow, then the
stage run on it with `manifests/examples/digits-int8.yaml`. Tests reuse the same training code."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_stage.contract.errors import InputError

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
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise InputError(
            "the demo's digits come with scikit-learn, which this install leaves out",
            hint="pip install 'pipeline-stage[local]' (scikit-learn and the full MLflow for the demo's local store)",
        ) from exc

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    return DigitsData(train=(x[:1200], y[:1200]), calibration=(x[:200], y[:200]), evaluation=(x[1200:], y[1200:]))


def train_digits_cnn(data: DigitsData, *, epochs: int = 12, seed: int = 0):
    """A small CNN (~10k parameters) that reaches ~97% top-1 on held-out digits in seconds."""
    from pipeline_stage.engine.tf_env import import_tf

    import_tf()
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1), name="image"),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax", name="probabilities"),
        ],
        name="digits_cnn",
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(*data.train, epochs=epochs, batch_size=32, verbose=0)
    return model


def raw_digits_data(size: int = 16, seed: int = 0) -> DigitsData:
    """The same digits, bilinearly upscaled to `size` x `size` and left in raw 0..255 pixel units
    (MNIST's units, fed without normalization: the BatchNorm layers are trusted to normalize)."""
    from pipeline_stage.engine.tf_env import import_tf

    tf = import_tf()
    data = digits_data(seed)

    def up(x):
        return (tf.image.resize(x * 255.0, (size, size), method="bilinear").numpy()).astype(np.float32)

    return DigitsData(*((up(x), y) for x, y in (data.train, data.calibration, data.evaluation)))


def train_bn_after_relu_cnn(data: DigitsData, *, epochs: int = 8, seed: int = 0):
    """A CNN with BatchNormalization *after* each ReLU (Conv-ReLU-BN-MaxPool x2, Dense), trained on
    :func:`raw_digits_data`: ~97% top-1 in Keras, but plain full-int8 conversion collapses it.

    How it breaks, honestly: the converter leaves a BN after an activation as MUL+ADD. On raw pixel
    units the active channels before the first BN have variances in the thousands while rarely
    firing channels have tiny ones, so the BN's per-channel scales span ~1000x (0.016..17.5 here):
    one per-tensor int8 scale for the ReLU output and one for the MUL's constant wipe out the small
    channels. `fuse` moves each scale backward into the convolution (exact), after which int8 keeps
    the accuracy.
    """
    from pipeline_stage.engine.tf_env import import_tf

    import_tf()
    import keras

    keras.utils.set_random_seed(seed)
    size = data.train[0].shape[1]
    layers: list = [keras.Input((size, size, 1), name="image")]
    for filters in (16, 32):
        layers += [
            keras.layers.Conv2D(filters, 3, padding="same"),
            keras.layers.ReLU(),
            keras.layers.BatchNormalization(momentum=0.9),
            keras.layers.MaxPooling2D(),
        ]
    layers += [keras.layers.Flatten(), keras.layers.Dense(10, activation="softmax", name="probabilities")]
    model = keras.Sequential(layers, name="digits_bn_after_relu")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(*data.train, epochs=epochs, batch_size=32, verbose=0)
    return model


def build_two_heads(seed: int = 0):
    """A two-input (`audio`, `meta`), two-output (`label`, `level`) Keras model whose weights are
    set, not trained, so that plain full int8 ruins one output: the `wide` layer has one channel a
    thousand times larger than the others; full int8 gives that activation one scale, so the small
    channels, which alone feed `level`, round to zero. `label` reads the shared layer and survives.
    Returns the model and a function `inputs(n)` that draws real-looking inputs by name."""
    from pipeline_stage.engine.tf_env import import_tf

    import_tf()
    import keras

    audio, meta = keras.Input((16,), name="audio"), keras.Input((4,), name="meta")
    shared = keras.layers.Dense(16, activation="relu", name="shared")(keras.layers.Concatenate()([audio, meta]))
    label = keras.layers.Dense(3, activation="softmax", name="label")(shared)
    wide = keras.layers.Dense(8, name="wide")(shared)
    level = keras.layers.Dense(1, name="level")(wide)
    model = keras.Model({"audio": audio, "meta": meta}, {"label": label, "level": level})
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in layer.get_weights()])
    kernel, bias = model.get_layer("wide").get_weights()
    kernel[:, 0] *= 1000.0
    bias[0] = 1000.0
    model.get_layer("wide").set_weights([kernel, bias])
    head, head_bias = model.get_layer("level").get_weights()
    head[0] = 0.0
    model.get_layer("level").set_weights([head, np.zeros_like(head_bias)])

    def inputs(n: int) -> dict[str, np.ndarray]:
        return {"audio": rng.uniform(0, 1, (n, 16)).astype(np.float32), "meta": rng.uniform(0, 1, (n, 4)).astype(np.float32)}

    return model, inputs


def _three_head_trunk(keras, x, h, width: int, seed: int, scale: float):
    """A Keras model from input `x` through `h`, two tanh Dense layers (`trunk1`, `trunk2`) and
    three Dense outputs `a` (8), `b` (4), `c` (2), its kernels seeded (normal, `scale` / sqrt(fan-in))
    and its biases zero; and the generator, to draw inputs from after."""
    h = keras.layers.Dense(width, activation="tanh", name="trunk1")(h)
    h = keras.layers.Dense(width, activation="tanh", name="trunk2")(h)
    model = keras.Model(x, [keras.layers.Dense(k, name=n)(h) for n, k in (("a", 8), ("b", 4), ("c", 2))])
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.weights:
            kernel, bias = layer.get_weights()
            weights = scale * rng.normal(0, 1 / np.sqrt(kernel.shape[0]), kernel.shape).astype(np.float32)
            layer.set_weights([weights, np.zeros_like(bias)])
    return model, rng


def build_wide_range_trunk(seed: int = 0, features: int = 64, width: int = 96):
    """A float .tflite with one input and three outputs (`a`, `b`, `c`) that share a trunk, whose
    input has one feature on a scale 30,000 times the others (a raw energy beside normalized
    spectra), weighted down by the first layer: quantizing the input's activations at 8 or 16 bits
    (full int8, dynamic, int16x8) rounds the small features away, and every output with them; the
    outputs share the trunk, so keeping one output's own nodes float does not help. Weight-only
    and float16 recipes keep the activations float. Weights are set (seeded), not trained.
    Returns (float .tflite bytes, `inputs(n)` drawing inputs for `x`)."""
    from pipeline_stage.engine.tf_env import import_tf

    tf = import_tf()
    import keras

    x = keras.Input((features,), name="x")
    model, rng = _three_head_trunk(keras, x, x, width, seed, scale=1.0)
    kernel, bias = model.get_layer("trunk1").get_weights()
    kernel[0, :] *= 1e-5
    model.get_layer("trunk1").set_weights([kernel, bias])
    flatbuffer = tf.lite.TFLiteConverter.from_keras_model(model).convert()

    def inputs(n: int) -> np.ndarray:
        out = rng.normal(size=(n, features)).astype(np.float32)
        out[:, 0] *= 3e4
        return out

    return flatbuffer, inputs


def build_log_spectrum_trunk(seed: int = 0, features: int = 64, width: int = 96):
    """A float .tflite like a third-party audio model: one input of power-spectrum frames (values
    spanning six orders of magnitude), LOG of the spectrum plus a small offset, a dense trunk and
    three outputs (`output_0..2`). In full int8 the input range leaves the small powers at zero, so
    the LOG op's error dwarfs every other op's by orders of magnitude (keeping it and the ADD that
    feeds it float is the obvious first refinement), and even then int8 cannot serve the outputs
    (under 12 dB); weight-only recipes keep the activations float and pass. Weights are set
    (seeded), not trained. Returns (float .tflite bytes, `inputs(n)` drawing spectra)."""
    from pipeline_stage.engine.tf_env import import_tf

    tf = import_tf()
    import keras

    keras.utils.set_random_seed(seed)
    x = keras.Input((features,), name="spectrum")
    h = keras.layers.Activation(keras.ops.log, name="log")(keras.layers.Rescaling(1.0, offset=1e-4, name="offset")(x))
    model, rng = _three_head_trunk(keras, x, h, width, seed, scale=0.3)
    flatbuffer = tf.lite.TFLiteConverter.from_keras_model(model).convert()

    def inputs(n: int) -> np.ndarray:
        return (rng.exponential(1.0, (n, features)) ** 3 * 10 ** rng.uniform(-4, 2, (n, 1))).astype(np.float32)

    return flatbuffer, inputs


def log_source_model(
    model,
    data: DigitsData,
    *,
    name: str = DEMO_MODEL_NAME,
    alias: str | None = DEMO_ALIAS,
    experiment: str = "pipeline-stage-demo",
) -> dict[str, Any]:
    """Log `model` and its data (data/{train,calib,eval}.npz) to one run; register and alias it."""
    import mlflow
    from mlflow.models import infer_signature

    from pipeline_stage.engine.tf_env import stdout_to_stderr

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
    return {
        "run_id": run.info.run_id,
        "name": name,
        "version": version,
        "accuracy": acc,
        "uri": f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}",
    }


def example_manifest(name: str = EXAMPLE_MANIFEST) -> Path:
    """Find an example manifest: $PIPELINE_STAGE_EXAMPLES, the source checkout, or the working directory."""
    candidates = []
    if os.environ.get("PIPELINE_STAGE_EXAMPLES"):
        candidates.append(Path(os.environ["PIPELINE_STAGE_EXAMPLES"]) / name)
    candidates += [
        Path(__file__).resolve().parents[1] / "manifests" / "examples" / name,
        Path.cwd() / "manifests" / "examples" / name,
    ]
    for path in candidates:
        if path.is_file():
            return path
    from pipeline_stage.contract.errors import InputError

    raise InputError(
        f"example manifest `{name}` not found (looked in: {', '.join(str(c.parent) for c in candidates)})",
        hint="run from the source checkout or set PIPELINE_STAGE_EXAMPLES to manifests/examples",
    )
