"""The tf_keras child process of :mod:`pipeline_stage.engine.tfmot_bridge` (run with TF_USE_LEGACY_KERAS=1).

``python -m pipeline_stage.engine.tfmot_worker FOLDER`` reads graph.json, weights.npz and task.json from
FOLDER, rebuilds the model with tf_keras, runs the task and writes result.json (plus
weights_out.npz, outputs.npy or model.tflite). Progress goes to stdout, one line per epoch, which
the parent relays; everything else goes to stderr (the parent keeps it as worker.log).

Tasks: ``roundtrip`` (predict, to prove the bridge exact), ``prune`` (tfmot magnitude pruning,
fine-tune, strip) and ``qat`` (tfmot quantization-aware training, fine-tune, convert to int8).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from pipeline_stage.engine.keras_graph import assign_weights, weights_by_name, wire


class TaskInputError(Exception):
    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


def build(folder: Path):
    import tf_keras

    graph = json.loads((folder / "graph.json").read_text())

    def make_input(spec, k):
        shape = spec["config"].get("batch_shape") or spec["config"].get("batch_input_shape")
        return tf_keras.Input(batch_shape=tuple(shape), name=spec["name"])

    def make_layer(spec):
        try:
            return getattr(tf_keras.layers, spec["class_name"]).from_config(dict(spec["config"]))
        except (TypeError, ValueError) as exc:
            raise TaskInputError(f"layer `{spec['name']}` ({spec['class_name']}) does not rebuild in tf_keras: {exc}") from None

    inputs, outputs, layers = wire(graph, make_input, make_layer)
    model = tf_keras.Model(inputs, outputs, name=graph["name"])
    with np.load(folder / "weights.npz") as saved:
        assign_weights(layers.values(), saved)
    return model


def _data(spec):
    """`x` and `y` (None without labels): from a dict of .npy files by name (Dataset.files: both
    memory-mapped, read a batch at a time), or an .npz read whole (the roundtrip task's)."""
    if isinstance(spec, dict):  # one input, one output (tfmot_bridge.run_task refuses more)
        features = [k for k in spec if k != "y" and not k.startswith("y.")]
        labels = [k for k in spec if k == "y" or k.startswith("y.")]
        x = np.load(spec["x" if "x" in spec else features[0]], mmap_mode="r")
        return x, (np.load(spec[labels[0]], mmap_mode="r") if labels else None)
    with np.load(spec) as d:
        return d["x"].astype(np.float32), d["y"] if "y" in d.files else None


def _batches(x, y, batch_size: int, seed: int):
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


def _compile(model, params, x, y):
    import tf_keras

    if y is None:
        raise TaskInputError(
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


class _Progress:
    """One plain line per epoch on stdout (the parent relays it to the console or Kubeflow log)."""

    def __new__(cls, label: str, epochs: int):
        import tf_keras

        class Callback(tf_keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                stats = " ".join(f"{k}={v:.4f}" for k, v in (logs or {}).items())
                print(f"{label}: epoch {epoch + 1}/{epochs} {stats}", file=sys.__stdout__, flush=True)

        return Callback()


def _sparsity(weights: list[np.ndarray]) -> float:
    total = sum(w.size for w in weights)
    return float(sum(int(np.sum(w == 0)) for w in weights) / total) if total else 0.0


def prune(folder: Path, task: dict) -> dict:
    import tensorflow_model_optimization as tfmot
    import tf_keras

    p = task["params"]
    model = build(folder)
    x, y = _data(task["training"])
    steps_per_epoch = int(np.ceil(len(x) / p["batch_size"]))
    end_step = max(1, steps_per_epoch * p["epochs"])
    sparsity = tfmot.sparsity.keras
    if p["schedule"] == "constant":
        schedule = sparsity.ConstantSparsity(p["target_sparsity"], begin_step=0, frequency=max(1, steps_per_epoch // 4))
    else:
        schedule = sparsity.PolynomialDecay(
            initial_sparsity=0.0,
            final_sparsity=p["target_sparsity"],
            begin_step=0,
            end_step=max(1, int(end_step * 0.8)),
            frequency=max(1, steps_per_epoch // 4),
        )
    prunable = set(p.get("layer_types") or ["Conv2D", "Dense", "DepthwiseConv2D", "Conv1D", "SeparableConv2D"])

    def wrap(layer):
        if type(layer).__name__ in prunable:
            return sparsity.prune_low_magnitude(layer, pruning_schedule=schedule)
        return layer

    # clone_function gets the original layers, so wrapped and unwrapped layers keep their trained weights.
    pruned = tf_keras.models.clone_model(model, clone_function=wrap)
    _compile(pruned, p, x, y)
    callbacks = [sparsity.UpdatePruningStep(), _Progress("prune", p["epochs"])]
    pruned.fit(_batches(x, y, p["batch_size"], task.get("seed", 0)), epochs=p["epochs"], verbose=0, callbacks=callbacks)
    stripped = sparsity.strip_pruning(pruned)
    np.savez(folder / "weights_out.npz", **weights_by_name(stripped.layers))
    kernels = {
        layer.name: layer.get_weights()[0]
        for layer in stripped.layers
        if type(layer).__name__ in prunable and layer.get_weights()
    }
    return {
        "sparsity": _sparsity(list(kernels.values())),
        "per_layer_sparsity": {name: round(_sparsity([k]), 4) for name, k in kernels.items()},
    }


def qat(folder: Path, task: dict) -> dict:
    import tensorflow_model_optimization as tfmot

    p = task["params"]
    model = build(folder)
    x, y = _data(task["training"])
    try:
        q_model = tfmot.quantization.keras.quantize_model(model)
    except (ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0]
        hint = "use post-training `quantize: {mode: int8}`"
        if "BatchNormalization" in first:  # tfmot quantizes BN only right after a conv/dense
            hint += ", or run `fuse` first so no BatchNormalization follows an activation"
        raise TaskInputError(f"tfmot cannot make this model quantization-aware: {first}", hint=hint) from None
    _compile(q_model, p, x, y)
    q_model.fit(
        _batches(x, y, p["batch_size"], task.get("seed", 0)),
        epochs=p["epochs"],
        verbose=0,
        callbacks=[_Progress("qat", p["epochs"])],
    )
    from pipeline_stage.contract.data import Dataset
    from pipeline_stage.contract.steps import ConversionSettings
    from pipeline_stage.engine.convert import build_converter

    cx, _ = _data(task["calibration"])
    cx = np.asarray(cx, dtype=np.float32)  # calibration_samples rows: small
    converter = build_converter(
        None, ConversionSettings(**task["conversion"]), keras_model=q_model, representative=Dataset(cx, None, "calibration")
    )
    print("qat: converting the quantization-aware model to int8", file=sys.__stdout__, flush=True)
    (folder / "model.tflite").write_bytes(converter.convert())
    return {}


def roundtrip(folder: Path, task: dict) -> dict:
    model = build(folder)
    x, _ = _data(task["data"])
    np.save(folder / "outputs.npy", np.asarray(model.predict(x, verbose=0)))
    return {"layers": len(model.layers)}


TASKS = {"prune": prune, "qat": qat, "roundtrip": roundtrip}


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
            result = TASKS[task["task"]](root, task)
    except TaskInputError as exc:
        result = {"error": str(exc), "hint": exc.hint, "kind": "input"}
    except Exception as exc:  # reported to the parent, which turns it into a PluginError
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = round(time.perf_counter() - started, 3)
    (root / "result.json").write_text(json.dumps(result))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
