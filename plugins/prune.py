"""Built-in step `prune`: magnitude pruning with tensorflow-model-optimization, fine-tuned on the
manifest's training data, wrappers stripped, then a sparsity-aware conversion.

tfmot needs tf_keras, so the work happens in a child process through the Keras 3 -> tf_keras
bridge (:mod:`pipeline_stage.engine.tfmot_bridge`); the pruned weights come back into a copy of the Keras 3
model, which the rest of the chain sees. Pruning pays off on disk and over the air once the
artifact is compressed: gate or compare on the `gzip_size_bytes` metric.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from pipeline_stage import (
    EpochProgress,
    Params,
    Phase,
    Step,
    build_tf_keras_model,
    compile_for_fine_tuning,
    fine_tuning_arrays,
    fine_tuning_batches,
    hookimpl,
    load_weights_into,
    run_tf_keras_task,
    weights_by_name,
)

SPARSE_WEIGHTS = "sparse_weights"  # the conversion hint: store the zeros sparsely where the format allows


class PruneParams(Params):
    target_sparsity: float = Field(0.5, gt=0, lt=1, description="Fraction of weights set to zero in each pruned layer.")
    schedule: Literal["polynomial", "constant"] = Field(
        "polynomial",
        description="polynomial: sparsity ramps from 0 to the target over 80% of fine-tuning; constant: the target from the start.",
    )
    epochs: int = Field(4, ge=1, le=1000, description="Fine-tuning epochs on the manifest's `training` data.")
    batch_size: int = Field(32, ge=1, le=65536, description="Fine-tuning batch size.")
    learning_rate: float = Field(5e-4, gt=0, lt=1, description="Adam learning rate for fine-tuning.")
    layer_types: list[Literal["Conv2D", "Dense", "DepthwiseConv2D", "Conv1D", "SeparableConv2D"]] = Field(
        default_factory=lambda: ["Conv2D", "Dense"], description="Keras layer types whose kernels are pruned."
    )
    seed: int = Field(0, description="Random seed of the fine-tuning (same seed, same result).")


class Prune(Step):
    """Magnitude pruning (tfmot): fine-tune to a target sparsity, strip wrappers, sparse-aware conversion."""

    name = "prune"
    phase = Phase.MODEL
    Params = PruneParams

    def required_data(self) -> set[str]:
        return {"training"}

    def expected_cost(self) -> float:
        return 2.0 + self.params.epochs

    def apply(self, model, ctx):

        folder = ctx.workdir / "prune"
        folder.mkdir(parents=True, exist_ok=True)
        # by reference: a streamed set's own memory-mapped files (else written once), read a batch at a time
        training = ctx.load_data("training").files(folder / "training")
        params = self.params.model_dump(mode="json")
        result = run_tf_keras_task(
            {"task": f"{__name__}:prune_in_tf_keras", "training": training, "params": params, "seed": self.params.seed},
            model,
            folder,
            log=ctx.log,
        )
        pruned = load_weights_into(model, folder / "weights_out.npz")
        ctx.conversion.hints[SPARSE_WEIGHTS] = True  # the float (and float16) conversion stores the zeros sparsely
        ctx.notes.update(
            {
                "weight_sparsity": round(result["sparsity"], 4),
                "per_layer_sparsity": result["per_layer_sparsity"],
                "fine_tune_seconds": result["seconds"],
            }
        )
        ctx.tags["pipeline_stage.prune.sparsity"] = f"{result['sparsity']:.4f}"
        return pruned


def _sparsity(weights: list[np.ndarray]) -> float:
    total = sum(w.size for w in weights)
    return float(sum(int(np.sum(w == 0)) for w in weights) / total) if total else 0.0


def prune_in_tf_keras(folder: Path, task: dict) -> dict:
    """The tf_keras child's task (pipeline_stage.engine.tfmot_worker): tfmot magnitude pruning of the
    rebuilt model, fine-tuned on the training data, wrappers stripped; weights_out.npz."""
    import tensorflow_model_optimization as tfmot
    import tf_keras

    p = task["params"]
    model = build_tf_keras_model(folder)
    x, y = fine_tuning_arrays(task["training"])
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
    compile_for_fine_tuning(pruned, p, x, y)
    callbacks = [sparsity.UpdatePruningStep(), EpochProgress("prune", p["epochs"])]
    pruned.fit(
        fine_tuning_batches(x, y, p["batch_size"], task.get("seed", 0)), epochs=p["epochs"], verbose=0, callbacks=callbacks
    )
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


@hookimpl
def register_steps(register):
    register(Prune)
