"""Built-in step `fuse`: fold BatchNormalization into the neighbouring linear layers, exactly.

Two foldings, on Sequential and functional models (branches and residual adds included), wherever
the layers involved use each other's outputs exclusively:

* BN right after a linear layer (Conv2D, DepthwiseConv2D, Dense without activation): fold it into
  that layer's kernel and bias. The converter does this too; doing it here keeps the graph simple
  for the steps that follow.
* BN after a positively homogeneous activation (ReLU, LeakyReLU; not ReLU6), which the converter
  leaves as MUL+ADD and which wrecks full-int8 accuracy: with a positive per-channel scale `s`,
  ReLU(s*z) = s*ReLU(z), so `s` moves backward into the producing layer (the activations are then
  already normalized when they are quantized) and the shift `t` moves forward into the next linear
  layer's bias. That is exact when nothing between them breaks per-channel constants: max/average
  pooling, dropout and flatten pass them through; a convolution with `valid` padding (or a 1x1
  kernel) or a Dense layer absorbs them. When the shift cannot move (the next convolution pads with
  zeros), the scale still moves backward and the BN stays as a per-channel add only: also exact,
  and the add is harmless to int8 once the channels are normalized. Anything else leaves that BN
  alone, and the report says why.

Where no BN remains, ``equalize: true`` applies cross-layer equalization (Nagel et al., 2019): for
two linear layers with a ReLU between them, output channel i of the first is divided by s_i and
input channel i of the second multiplied by s_i, with s_i = sqrt(r1_i / r2_i) from the channels'
weight ranges, so both see the same per-channel range. Exact for the same reason (ReLU(z/s) =
ReLU(z)/s); it helps per-tensor int8 activations and per-channel int8 weights alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from pipeline_stage import (
    Chain,
    InputError,
    ModelFacts,
    Params,
    Phase,
    SearchMove,
    Step,
    hookimpl,
    layer_graph,
    rebuild,
    step_params,
)
from pipeline_stage_plugins.fuse_graph import LINEAR, FoldGraph, act_name, as_float64, equalize


class FuseParams(Params):
    batchnorm: bool = Field(True, description="Fold BatchNormalization layers into neighbouring linear layers.")
    equalize: bool = Field(
        False,
        description="Cross-layer equalization of consecutive linear layers with a ReLU/LeakyReLU "
        "between them (after BN folding), for models without BN.",
    )
    tolerance: float = Field(
        1e-3,
        gt=0,
        description="Largest allowed output difference (max abs) between the "
        "model before and after; larger means a bug, and the step fails.",
    )


class Fuse(Step):
    """Fold BatchNorm into Conv/Dense, including BN after ReLU (scale backward, shift forward)."""

    name = "fuse"
    phase = Phase.MODEL
    Params = FuseParams

    def apply(self, model, ctx):
        bns = [layer for layer in model.layers if type(layer).__name__ == "BatchNormalization"]
        notes: dict[str, Any] = {
            "batchnorm_layers": len(bns),
            "folded_into_previous": [],
            "scale_backward_shift_forward": [],
            "scale_backward_shift_kept": [],
            "left_alone": [],
        }
        ctx.notes.update(notes)
        if not (self.params.batchnorm and bns) and not self.params.equalize:
            return model
        graph = layer_graph(model, purpose="fuse")
        g = FoldGraph(model, graph)  # per call: a step instance holds no graph state
        names = [spec["name"] for spec in graph["layers"] if spec["class_name"] != "InputLayer"]
        weights = {n: [as_float64(w) for w in model.get_layer(n).weights] for n in names}
        configs = {n: model.get_layer(n).get_config() for n in names}
        changed = False

        def kernel_bias(layer) -> tuple[np.ndarray, np.ndarray]:
            w = weights[layer.name]
            kernel = w[0]
            bias = w[1] if len(w) > 1 else np.zeros(self._out_channels(layer, kernel))
            return kernel, bias

        def set_kernel_bias(layer, kernel, bias):
            weights[layer.name] = [kernel, bias]
            configs[layer.name]["use_bias"] = True

        for bn in (b for b in bns if self.params.batchnorm):
            if bn.get_config().get("axis") not in (-1, [-1], len(bn.input.shape) - 1, [len(bn.input.shape) - 1]):
                notes["left_alone"].append({"layer": bn.name, "reason": "normalizes an axis other than the last"})
                continue
            s, t = self._scale_shift(bn)
            prev = g.inbound(bn.name)
            prev_layer = model.get_layer(prev) if prev in weights else None
            if (
                prev_layer is not None
                and type(prev_layer).__name__ in LINEAR
                and act_name(prev_layer) == "linear"
                and g.users(prev) == [bn.name]
            ):
                kernel, bias = kernel_bias(prev_layer)
                set_kernel_bias(prev_layer, self._scale_out(prev_layer, kernel, s), bias * s + t)
                g.dropped.add(bn.name)
                notes["folded_into_previous"].append(bn.name)
                continue
            producer, act = g.producer(prev, bn.name)
            if producer is None:
                notes["left_alone"].append(
                    {
                        "layer": bn.name,
                        "reason": "not after a linear layer (or a ReLU/LeakyReLU on one) whose output only it uses",
                    }
                )
                continue
            if act not in ("relu", "leaky_relu"):
                notes["left_alone"].append({"layer": bn.name, "reason": f"activation `{act}` is not positively homogeneous"})
                continue
            if np.any(s <= 0):
                notes["left_alone"].append({"layer": bn.name, "reason": f"{int(np.sum(s <= 0))} channel scale(s) not positive"})
                continue
            target, reason, tile = g.shift_target(bn.name)
            cfg = bn.get_config()
            if target is None and not (cfg.get("center", True) and cfg.get("scale", True)):
                notes["left_alone"].append({"layer": bn.name, "reason": reason})
                continue
            kernel, bias = kernel_bias(producer)
            set_kernel_bias(producer, self._scale_out(producer, kernel, s), bias * s)
            if target is None:  # the scale moved backward; the BN keeps only the shift (gamma 1, mean 0, var 1 - eps)
                weights[bn.name] = [np.ones_like(s), t, np.zeros_like(s), np.full_like(s, 1.0 - bn.epsilon)]
                changed = True
                notes["scale_backward_shift_kept"].append({"layer": bn.name, "reason": reason})
                continue
            k2, b2 = kernel_bias(target)
            shift = np.tile(t, tile)
            if type(target).__name__ == "Dense":
                b2 = b2 + shift @ k2
            elif type(target).__name__ == "Conv2D":
                b2 = b2 + np.einsum("hwio,i->o", k2, shift)
            else:  # DepthwiseConv2D: each input channel feeds its own outputs
                b2 = b2 + (k2.sum(axis=(0, 1)) * shift[:, None]).reshape(-1)
            set_kernel_bias(target, k2, b2)
            g.dropped.add(bn.name)
            notes["scale_backward_shift_forward"].append(bn.name)
        if self.params.equalize:
            chain = g.chain(graph)
            if chain is None:
                notes["equalized"] = "only for models whose layers form a chain (no branches)"
            else:
                notes["equalized"] = equalize(chain, weights, kernel_bias, set_kernel_bias)
                changed = changed or bool(notes["equalized"])
        if not g.dropped and not changed:
            return model
        fused = rebuild(model, graph, dropped=g.dropped, configs=configs, weights=weights)
        self._check_exact(model, fused, ctx)
        notes["batchnorm_layers_after"] = len(bns) - len(g.dropped)
        ctx.notes.update(notes)
        return fused

    @staticmethod
    def _scale_shift(bn) -> tuple[np.ndarray, np.ndarray]:
        mean, var = as_float64(bn.moving_mean), as_float64(bn.moving_variance)
        gamma = as_float64(bn.gamma) if bn.gamma is not None else np.ones_like(mean)
        beta = as_float64(bn.beta) if bn.beta is not None else np.zeros_like(mean)
        s = gamma / np.sqrt(var + bn.epsilon)
        return s, beta - mean * s

    @staticmethod
    def _out_channels(layer, kernel) -> int:
        if type(layer).__name__ == "DepthwiseConv2D":
            return kernel.shape[2] * kernel.shape[3]
        return kernel.shape[-1]

    @staticmethod
    def _scale_out(layer, kernel, s) -> np.ndarray:
        if type(layer).__name__ == "DepthwiseConv2D":
            return kernel * s.reshape(kernel.shape[2], kernel.shape[3])
        return kernel * s

    def _check_exact(self, before, after, ctx) -> None:
        shape = [d if d else 1 for d in before.inputs[0].shape[1:]]
        x = np.random.default_rng(0).uniform(0, 1, size=[8, *shape]).astype(np.float32)
        try:
            x = ctx.load_data("evaluation").x[:64].astype(np.float32)
        except InputError:  # no evaluation data given: the seeded uniform inputs above
            pass
        diff = float(np.max(np.abs(before.predict(x, verbose=0) - after.predict(x, verbose=0))))
        ctx.notes["max_abs_output_difference"] = diff
        if diff > self.params.tolerance:
            raise InputError(
                f"fuse changed the model's outputs by {diff:.3g} (tolerance {self.params.tolerance})",
                hint="report this model to the pipeline-stage maintainers; drop `fuse` meanwhile",
            )


@hookimpl
def register_steps(register):
    register(Fuse)


class FuseFirst(SearchMove):
    """Put `fuse` in front of a full-int8 chain when the model has BatchNorm (BN after ReLU wrecks int8)."""

    name = "fuse"
    kind = "alternative"
    requirement = "a chain that quantizes to full int8 and has no `fuse` yet"

    def applies(self, chain: Chain) -> bool:
        quantize = step_params(chain, "quantize")
        mode = None if quantize is None else quantize.get("mode", "int8")
        return mode == "int8" and all(name != "fuse" for name, _ in chain)

    def propose(self, chain: Chain, facts: ModelFacts) -> list[tuple[str, Chain]]:
        if "BatchNormalization" not in facts.layer_classes:
            return []
        return [("fold BatchNorm (fuse)", [("fuse", {}), *chain])]


@hookimpl
def register_search_moves(register):
    register(FuseFirst)
