"""Built-in step `prune`: magnitude pruning with tensorflow-model-optimization, fine-tuned on the
manifest's training data, wrappers stripped, then a sparsity-aware conversion.

tfmot needs tf_keras, so the work happens in a child process through the Keras 3 -> tf_keras
bridge (:mod:`pipeline_stage.engine.tfmot_bridge`); the pruned weights come back into a copy of the Keras 3
model, which the rest of the chain sees. Pruning pays off on disk and over the air once the
artifact is compressed: gate or compare on the `gzip_size_bytes` metric.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline_stage import Params, Phase, Step, hookimpl, load_weights_into, run_tf_keras_task


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
            {"task": "prune", "training": training, "params": params, "seed": self.params.seed},
            model,
            folder,
            log=ctx.log,
        )
        pruned = load_weights_into(model, folder / "weights_out.npz")
        ctx.conversion.sparsity = True  # the converter stores the zeros sparsely where that runs (see convert.sparse_storage)
        ctx.notes.update(
            {
                "weight_sparsity": round(result["sparsity"], 4),
                "per_layer_sparsity": result["per_layer_sparsity"],
                "fine_tune_seconds": result["seconds"],
            }
        )
        ctx.tags["pipeline_stage.prune.sparsity"] = f"{result['sparsity']:.4f}"
        return pruned


@hookimpl
def register_steps(register):
    register(Prune)
