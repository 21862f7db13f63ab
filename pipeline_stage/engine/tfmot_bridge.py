"""The bridge to tensorflow-model-optimization: Keras 3 model -> tf_keras, work there, results back.

tfmot (pruning, quantization-aware training) works only on tf_keras models, and tf_keras is
selected by ``TF_USE_LEGACY_KERAS=1`` before TensorFlow is imported: that cannot happen in a
process that already runs Keras 3. So the parent writes the model as a plain graph description
(layer class, config, inbound layers) plus its weights, and a child process
(``python -m pipeline_stage.engine.tfmot_worker``) rebuilds it with tf_keras, runs the task and writes
back weights (pruning) or a .tflite (QAT). Only standard Keras layers cross the bridge; anything
else is a clear :class:`InputError` naming the layer, before the child starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline_stage.contract.errors import InputError, PluginError
from pipeline_stage.engine.keras_graph import assign_weights, layer_graph, weights_by_name

# Layers tf_keras has under the same name with a compatible config and weight order.
BRIDGEABLE = frozenset(
    {
        "InputLayer",
        "Conv1D",
        "Conv2D",
        "DepthwiseConv2D",
        "SeparableConv2D",
        "Dense",
        "BatchNormalization",
        "ReLU",
        "LeakyReLU",
        "Activation",
        "Softmax",
        "MaxPooling1D",
        "MaxPooling2D",
        "AveragePooling1D",
        "AveragePooling2D",
        "GlobalAveragePooling1D",
        "GlobalAveragePooling2D",
        "GlobalMaxPooling2D",
        "Flatten",
        "Dropout",
        "Reshape",
        "ZeroPadding2D",
        "Add",
        "Multiply",
        "Concatenate",
        "Rescaling",
        "LayerNormalization",
        "Embedding",
        "Permute",
        "UpSampling2D",
    }
)
# Keras 3 config keys tf_keras does not know; they carry no meaning for a float model of these layers.
KERAS3_ONLY_KEYS = ("quantization_config", "lora_rank", "lora_alpha", "lora_enabled", "synchronized")
# Keras 3 options tf_keras lacks: dropped when off (tf_keras then computes the same), refused when on.
KERAS3_ONLY_OPTIONS = ("rms_scaling",)
# Keras 3 config keys tf_keras spells differently, per layer class.
RENAMED_KEYS = {"LeakyReLU": {"negative_slope": "alpha"}}


def tf_keras_config(name: str, class_name: str, config: dict[str, Any]) -> dict[str, Any]:
    """The Keras 3 layer config `config` as tf_keras expects it.

    :raises InputError: for a layer class the bridge does not carry, or a Keras 3 option it lacks.
    """
    if class_name not in BRIDGEABLE:
        raise InputError(
            f"layer `{name}` ({class_name}) has no tf_keras counterpart, so prune/qat cannot use this model",
            hint=f"use standard Keras layers ({', '.join(sorted(BRIDGEABLE)[:8])}, ...) or drop prune/qat",
        )
    out = {k: v for k, v in config.items() if k not in KERAS3_ONLY_KEYS}
    for option in KERAS3_ONLY_OPTIONS:
        if out.pop(option, None):
            raise InputError(
                f"layer `{name}` ({class_name}) uses `{option}`, which tf_keras does not have, "
                "so prune/qat cannot use this model",
                hint="drop prune/qat, or train without that option",
            )
    for keras3_key, tf_keras_key in RENAMED_KEYS.get(class_name, {}).items():
        if keras3_key in out:
            out[tf_keras_key] = out.pop(keras3_key)
    dtype = out.get("dtype")
    if isinstance(dtype, dict):  # Keras 3 DTypePolicy -> the plain name tf_keras expects
        out["dtype"] = dtype.get("config", {}).get("name", "float32")
    for key in list(out):
        # Weights are copied across, so initializers do not matter; their Keras 3 serialization does not
        # always deserialize in tf_keras.
        if key.endswith("_initializer"):
            out.pop(key)
    return out


def describe_graph(model) -> dict[str, Any]:
    """A tf_keras-buildable description of a Keras 3 Sequential or functional model.

    :raises InputError: for a layer without a tf_keras counterpart, a nested model or a shared layer.
    """
    graph = layer_graph(model, purpose="the tf_keras bridge (prune, qat)")
    for spec in graph["layers"]:
        spec["config"] = tf_keras_config(spec["name"], spec["class_name"], spec["config"])
    return graph


def write_model(model, folder: Path) -> None:
    """Graph description + weights of `model` into `folder` (graph.json, weights.npz)."""
    graph = describe_graph(model)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "graph.json").write_text(json.dumps(graph, default=str))
    np.savez(folder / "weights.npz", **weights_by_name(model.layers))


def load_weights_into(model, weights_path: Path):
    """A Keras 3 copy of `model` with the weights the child wrote (same architecture, new values)."""
    import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())  # clone_model re-initializes; start from the original
    with np.load(weights_path) as saved:
        assign_weights(clone.layers, saved)
    return clone


def run_task(
    task: dict[str, Any], model, workdir: Path, *, log: Callable[[str], None] = print, timeout_s: float = 3600
) -> dict[str, Any]:
    """Run `task` (see tfmot_worker) on `model` in a tf_keras child; return its result.json.

    The child's progress lines (one per epoch) are passed to `log` as they come.
    """
    if len(model.inputs) > 1 or len(model.outputs) > 1:
        raise InputError(
            f"prune and qat fine-tune single-input, single-output models; this one has {len(model.inputs)} inputs "
            f"and {len(model.outputs)} outputs",
            hint="use post-training quantization (`quantize: {mode: int8}`, checked with fidelity gates)",
        )
    workdir.mkdir(parents=True, exist_ok=True)
    write_model(model, workdir)
    (workdir / "task.json").write_text(json.dumps(task))
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "pipeline_stage.engine.tfmot_worker", str(workdir)]
    log_path = workdir / "worker.log"
    expired = threading.Event()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True, env=env)
        assert proc.stdout is not None

        def kill() -> None:
            expired.set()
            proc.kill()

        # Reading the child's lines blocks until it closes stdout, so the time limit is a watchdog.
        watchdog = threading.Timer(timeout_s, kill)
        watchdog.start()
        try:
            for line in proc.stdout:
                line = line.rstrip()
                if line:
                    log(line)
            rc = proc.wait()
        finally:
            watchdog.cancel()
    if expired.is_set():
        raise PluginError(f"the tf_keras worker ran past {timeout_s:g} s and was stopped; its log: {log_path}")
    result_path = workdir / "result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    if rc != 0 or "error" in result:
        if result.get("kind") == "input":
            raise InputError(result["error"], hint=result.get("hint"))
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise PluginError(f"the tf_keras worker failed (exit {rc}): {result.get('error') or ' | '.join(tail)}; log: {log_path}")
    return result
