"""Acme's quantization engine: int8 weights with float compute, per channel or per tensor."""

from typing import Literal

from pydantic import Field

from pipeline_stage import InputError, Params, QuantizationEngine, hookimpl


class AcmeOptions(Params):
    granularity: Literal["channel", "tensor"] = Field(
        "channel", description="One weight scale per output channel, or per tensor."
    )


class AcmeWeights(QuantizationEngine):
    """Int8 weights, float compute: the LiteRT Quantizer's weight-only recipe on the float .tflite."""

    name = "acme_weights"
    modes = ("weight_only",)  # what `quantize: {mode: ...}` may ask of it
    Params = AcmeOptions  # `quantize: {engine: acme_weights, options: {granularity: tensor}}`

    def quantize(self, job):
        from litert_quantizer import Quantizer, qtyping, recipe_manager

        granularity = {"channel": "CHANNELWISE", "tensor": "TENSORWISE"}[job.request.settings.granularity]
        recipe = recipe_manager.RecipeManager()
        recipe.add_weight_only_config(
            regex=".*",
            operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
            num_bits=8,
            granularity=qtyping.QuantGranularity[granularity],
        )
        float_model = job.float_model()  # the source converted to float, once
        quantizer = Quantizer(bytearray(float_model))
        quantizer.load_quantization_recipe(recipe.get_quantization_recipe())
        quantized = bytes(quantizer.quantize().quantized_model)
        if quantized == float_model:
            raise InputError("acme_weights found no weights to quantize", hint="use another engine for this model")
        job.log(f"int8 weights per {job.request.settings.granularity}")
        return quantized


@hookimpl
def register_quantization_engines(register):
    register(AcmeWeights)
