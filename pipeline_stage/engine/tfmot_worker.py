"""The tf_keras child process of :mod:`pipeline_stage.engine.tfmot_bridge` (run with TF_USE_LEGACY_KERAS=1).

``python -m pipeline_stage.engine.tfmot_worker FOLDER`` reads graph.json, weights.npz and task.json from
FOLDER, rebuilds the model with tf_keras, runs the task and writes result.json (plus what the task
writes: weights_out.npz, outputs.npy, model.tflite). Progress goes to stdout, one line per epoch,
which the parent relays; everything else goes to stderr (the parent keeps it as worker.log).

A task is a function ``task(folder, task) -> dict`` named in task.json as ``"module:function"``
(the plugins that fine-tune bring their own: ``prune``'s pruning, ``quantize``'s QAT), or
``roundtrip`` (predict, to prove the bridge exact). It uses the helpers here (public as
:func:`build_tf_keras_model`, :func:`fine_tuning_arrays`, :func:`fine_tuning_batches`,
:func:`compile_for_fine_tuning` and :class:`EpochProgress` in ``pipeline_stage``); the dict it
returns lands in result.json, and an ``InputError`` it raises reaches the parent as one (exit 2).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from pipeline_stage.contract.errors import InputError
from pipeline_stage.engine.keras_graph import assign_weights, wire


def build(folder: Path):
    """The tf_keras model the parent described in FOLDER, with its weights."""
    import tf_keras

    graph = json.loads((folder / "graph.json").read_text())

    def make_input(spec, k):
        shape = spec["config"].get("batch_shape") or spec["config"].get("batch_input_shape")
        return tf_keras.Input(batch_shape=tuple(shape), name=spec["name"])

    def make_layer(spec):
        try:
            return getattr(tf_keras.layers, spec["class_name"]).from_config(dict(spec["config"]))
        except (TypeError, ValueError) as exc:
            raise InputError(f"layer `{spec['name']}` ({spec['class_name']}) does not rebuild in tf_keras: {exc}") from None

    inputs, outputs, layers = wire(graph, make_input, make_layer)
    model = tf_keras.Model(inputs, outputs, name=graph["name"])
    with np.load(folder / "weights.npz") as saved:
        assign_weights(layers.values(), saved)
    return model


def training_arrays(spec):
    """`x` and `y` (None without labels): from a dict of .npy files by name (Dataset.files: both
    memory-mapped, read a batch at a time), or an .npz read whole (the roundtrip task's)."""
    if isinstance(spec, dict):  # one input, one output (tfmot_bridge.run_task refuses more)
        features = [k for k in spec if k != "y" and not k.startswith("y.")]
        labels = [k for k in spec if k == "y" or k.startswith("y.")]
        x = np.load(spec["x" if "x" in spec else features[0]], mmap_mode="r")
        return x, (np.load(spec[labels[0]], mmap_mode="r") if labels else None)
    with np.load(spec) as d:
        return d["x"].astype(np.float32), d["y"] if "y" in d.files else None


def batches(x, y, batch_size: int, seed: int):
    """The training data for `fit`, a batch at a time from the (memory-mapped) arrays, in a new
    order each epoch (seeded): the set is never held whole, and the pages a batch read are handed
    back after it."""
    import tf_keras

    from pipeline_stage.contract.data import release_pages

    class Batches(tf_keras.utils.Sequence):
        def __init__(self):
            super().__init__()
            self.epoch = 0
            self.order = np.random.default_rng(seed).permutation(len(x))

        def __len__(self) -> int:
            return int(np.ceil(len(x) / batch_size))

        def __getitem__(self, i: int):
            rows = np.sort(self.order[i * batch_size : (i + 1) * batch_size])  # sorted: reads go forward
            xb, yb = np.asarray(x[rows], dtype=np.float32), np.asarray(y[rows])
            release_pages([x, y])
            return xb, yb

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self.order = np.random.default_rng([seed, self.epoch]).permutation(len(x))

    return Batches()


def compile_for_fine_tuning(model, params, x, y):
    """Compile `model` for fine-tuning on `x`, `y`: Adam at `params["learning_rate"]`, the loss
    `params["loss"]` or, for "auto", sparse cross-entropy for class labels, else MSE."""
    import tf_keras

    if y is None:
        raise InputError(
            "fine-tuning needs labels: the training data has no `y`", hint="give `data: {training: ...}` an .npz with `x` and `y`"
        )
    loss = params.get("loss", "auto")
    if loss == "auto":
        out = np.asarray(model.predict(np.asarray(x[:16], dtype=np.float32), verbose=0))
        probabilities = out.ndim == 2 and out.shape[1] > 1 and np.all(out >= 0) and np.allclose(out.sum(1), 1, atol=1e-3)
        if np.issubdtype(y.dtype, np.integer) and out.ndim == 2 and out.shape[1] > 1:
            loss = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=not probabilities)
        else:
            loss = "mse"
    model.compile(
        optimizer=tf_keras.optimizers.Adam(params.get("learning_rate", 1e-4)),
        loss=loss,
        metrics=["accuracy"] if not isinstance(loss, str) else [],
    )


class EpochProgress:
    """One plain line per epoch on stdout (the parent relays it to the console or Kubeflow log)."""

    def __new__(cls, label: str, epochs: int):
        import tf_keras

        class Callback(tf_keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                stats = " ".join(f"{k}={v:.4f}" for k, v in (logs or {}).items())
                print(f"{label}: epoch {epoch + 1}/{epochs} {stats}", file=sys.__stdout__, flush=True)

        return Callback()


def roundtrip(folder: Path, task: dict) -> dict:
    """Predict with the rebuilt model (outputs.npy): the bridge's exactness test."""
    model = build(folder)
    x, _ = training_arrays(task["data"])
    np.save(folder / "outputs.npy", np.asarray(model.predict(x, verbose=0)))
    return {"layers": len(model.layers)}


def task_function(name: str):
    """The task a task.json names: ``roundtrip``, or ``"module:function"``."""
    if name == "roundtrip":
        return roundtrip
    module, _, function = name.partition(":")
    import importlib

    return getattr(importlib.import_module(module), function)


def main(folder: str) -> int:
    import os

    if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        print("set TF_USE_LEGACY_KERAS=1 (pipeline_stage.engine.tfmot_bridge does)", file=sys.stderr)
        return 2
    root = Path(folder)
    task = json.loads((root / "task.json").read_text())
    started = time.perf_counter()
    # Keras' own prints go to stderr: stdout carries only progress lines.
    try:
        import contextlib

        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")
        tf.keras.utils.set_random_seed(task.get("seed", 0))
        with contextlib.redirect_stdout(sys.stderr):
            result = task_function(task["task"])(root, task)
    except InputError as exc:
        result = {"error": exc.message, "hint": exc.hint, "kind": "input"}
    except Exception as exc:  # reported to the parent, which turns it into a PluginError
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = round(time.perf_counter() - started, 3)
    (root / "result.json").write_text(json.dumps(result))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
