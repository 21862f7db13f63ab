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

LINEAR = ("Conv2D", "Dense", "DepthwiseConv2D")
OUTPUT = "<model output>"
SHIFT_TRANSPARENT = (
    "MaxPooling2D",
    "AveragePooling2D",
    "Dropout",
    "Flatten",
    "GlobalAveragePooling2D",
    "GlobalMaxPooling2D",
    "SpatialDropout2D",
)


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


def _np(v: Any) -> np.ndarray:
    return np.asarray(v.numpy() if hasattr(v, "numpy") else v, dtype=np.float64)


def _act_name(layer) -> str | None:
    """'relu', 'leaky_relu', 'linear' or something else, for a layer's own or standalone activation."""
    cls = type(layer).__name__
    if cls == "ReLU":
        cfg = layer.get_config()
        if cfg.get("max_value") is None and not cfg.get("threshold"):
            return "relu" if not cfg.get("negative_slope") else "leaky_relu"
        return "relu6-like"
    if cls == "LeakyReLU":
        return "leaky_relu"
    if cls == "Activation" or cls in LINEAR:
        act = layer.get_config().get("activation", "linear")
        return act if isinstance(act, str) else "other"
    return None


def _flatten_tile(flatten) -> int:
    """How many times each channel repeats in a (channels-last) Flatten's output."""
    shape = flatten.input.shape
    return int(np.prod(shape[1:-1])) if len(shape) > 2 else 1


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
        self._specs = {spec["name"]: spec for spec in graph["layers"]}
        self._consumers: dict[str, list[str]] = {name: [] for name in self._specs}
        for spec in graph["layers"]:
            for name in spec["inbound"]:
                self._consumers[name].append(spec["name"])
        for name in graph["outputs"]:
            self._consumers[name].append(OUTPUT)
        self._model, self._dropped = model, set()
        names = [spec["name"] for spec in graph["layers"] if spec["class_name"] != "InputLayer"]
        weights = {n: [_np(w) for w in model.get_layer(n).weights] for n in names}
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
            prev = self._inbound(bn.name)
            prev_layer = model.get_layer(prev) if prev in weights else None
            if (
                prev_layer is not None
                and type(prev_layer).__name__ in LINEAR
                and _act_name(prev_layer) == "linear"
                and self._users(prev) == [bn.name]
            ):
                kernel, bias = kernel_bias(prev_layer)
                set_kernel_bias(prev_layer, self._scale_out(prev_layer, kernel, s), bias * s + t)
                self._dropped.add(bn.name)
                notes["folded_into_previous"].append(bn.name)
                continue
            producer, act = self._producer(prev, bn.name)
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
            target, reason, tile = self._shift_target(bn.name)
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
            self._dropped.add(bn.name)
            notes["scale_backward_shift_forward"].append(bn.name)
        if self.params.equalize:
            chain = self._chain(graph)
            if chain is None:
                notes["equalized"] = "only for models whose layers form a chain (no branches)"
            else:
                notes["equalized"] = self._equalize(chain, weights, kernel_bias, set_kernel_bias)
                changed = changed or bool(notes["equalized"])
        if not self._dropped and not changed:
            return model
        fused = rebuild(model, graph, dropped=self._dropped, configs=configs, weights=weights)
        self._check_exact(model, fused, ctx)
        notes["batchnorm_layers_after"] = len(bns) - len(self._dropped)
        ctx.notes.update(notes)
        return fused

    # -- the graph, as it is after the foldings so far ---------------------------------------------
    def _inbound(self, name: str) -> str | None:
        """The one layer feeding `name` (through folded-away BNs), or None for several inputs."""
        ins = self._specs[name]["inbound"]
        if len(ins) != 1:
            return None
        prev = ins[0]
        while prev in self._dropped:
            prev = self._specs[prev]["inbound"][0]
        return prev

    def _users(self, name: str) -> list[str]:
        """The layers (or OUTPUT) that use `name`'s output, through folded-away BNs."""
        out = []
        for user in self._consumers[name]:
            out.extend(self._users(user) if user in self._dropped else [user])
        return out

    def _layer(self, name: str | None):
        if name is None or name == OUTPUT or self._specs[name]["class_name"] == "InputLayer":
            return None
        return self._model.get_layer(name)

    def _producer(self, prev: str | None, bn: str):
        """The linear layer whose (ReLU-like) activated output only the BN uses, and that activation."""
        layer = self._layer(prev)
        if layer is None or self._users(prev) != [bn]:
            return None, None
        if type(layer).__name__ in LINEAR:
            return layer, _act_name(layer)
        act = _act_name(layer)
        lin_name = self._inbound(prev)
        linear = self._layer(lin_name)
        if (
            act is not None
            and linear is not None
            and type(linear).__name__ in LINEAR
            and _act_name(linear) == "linear"
            and self._users(lin_name) == [prev]
        ):
            return linear, act
        return None, None

    def _shift_target(self, bn: str):
        """The next linear layer that can absorb a per-channel shift exactly, and how to tile it."""
        tile, cur = 1, bn
        while True:
            users = self._users(cur)
            if len(users) != 1 or users[0] == OUTPUT:
                return (
                    None,
                    (
                        "no linear layer after it to take the shift"
                        if users == [OUTPUT] or not users
                        else f"its output feeds {len(users)} places"
                    ),
                    1,
                )
            layer = self._layer(users[0])
            cls = type(layer).__name__
            if cls in SHIFT_TRANSPARENT:
                tile = _flatten_tile(layer) if cls == "Flatten" else tile
                cur = users[0]
                continue
            if cls == "Dense":
                return layer, "", tile
            if cls in ("Conv2D", "DepthwiseConv2D"):
                cfg = layer.get_config()
                if tile != 1:
                    return None, "a convolution after flatten", 1
                if cfg["padding"] == "valid" or tuple(cfg["kernel_size"]) == (1, 1):
                    return layer, "", tile
                return None, f"the next layer `{layer.name}` pads with zeros ('same'), which a shift does not pass", 1
            return None, f"`{layer.name}` ({cls}) between this BN and the next linear layer does not pass a shift", 1

    def _chain(self, graph) -> list | None:
        """The kept layers in order when they form a single chain, else None."""
        kept = [
            spec["name"] for spec in graph["layers"] if spec["class_name"] != "InputLayer" and spec["name"] not in self._dropped
        ]
        for name in kept:
            if self._inbound(name) is None or len([u for u in self._users(name) if u != OUTPUT]) > 1:
                return None
        return [self._model.get_layer(name) for name in kept]

    @staticmethod
    def _equalize(kept, weights, kernel_bias, set_kernel_bias, passes: int = 4) -> list[dict[str, Any]]:
        """Cross-layer equalization over each linear -> ReLU-like -> (pooling, flatten, dropout) ->
        linear pair in the chain; returns the pairs with their range spread before and after."""
        pairs = []
        for i, first in enumerate(kept):
            if type(first).__name__ not in ("Conv2D", "Dense"):
                continue
            act = _act_name(first)
            j = i + 1
            if (
                act == "linear"
                and j < len(kept)
                and _act_name(kept[j]) in ("relu", "leaky_relu")
                and type(kept[j]).__name__ not in LINEAR
            ):
                act, j = _act_name(kept[j]), j + 1
            if act not in ("relu", "leaky_relu"):
                continue
            tile = 1
            while (
                j < len(kept)
                and type(kept[j]).__name__ in SHIFT_TRANSPARENT
                and type(kept[j]).__name__ != "GlobalAveragePooling2D"
            ):
                tile = _flatten_tile(kept[j]) if type(kept[j]).__name__ == "Flatten" else tile
                j += 1
            if (
                j < len(kept)
                and type(kept[j]).__name__ in ("Conv2D", "Dense")
                and (tile == 1 or type(kept[j]).__name__ == "Dense")
            ):
                pairs.append((first, kept[j], tile))
        report = []
        for first, second, tile in pairs:
            spread_before = None
            for _ in range(passes):
                k1, b1 = kernel_bias(first)
                k2, b2 = kernel_bias(second)
                channels = k1.shape[-1]
                r1 = np.abs(k1).reshape(-1, channels).max(axis=0)
                # Input channel c of the second layer: axis -2 of a conv kernel; rows c, c+C, ... of a Dense
                # kernel after flatten (channels-last flatten order).
                rows = (
                    np.abs(k2).reshape(-1, channels, k2.shape[-1])
                    if tile > 1
                    else np.moveaxis(np.abs(k2), -2, 0).reshape(channels, -1).T[None]
                )
                r2 = rows.max(axis=(0, 2)) if tile > 1 else rows[0].max(axis=0)
                if spread_before is None:
                    spread_before = float(r1.max() / max(r1.min(), 1e-12))
                ok = (r1 > 1e-12) & (r2 > 1e-12)
                scale = np.where(ok, np.sqrt(np.where(ok, r1, 1) / np.where(ok, r2, 1)), 1.0)
                set_kernel_bias(first, k1 / scale, b1 / scale)
                if tile > 1:
                    k2 = (k2.reshape(-1, channels, k2.shape[-1]) * scale[None, :, None]).reshape(k2.shape)
                else:
                    k2 = np.moveaxis(np.moveaxis(k2, -2, -1) * scale, -1, -2)
                set_kernel_bias(second, k2, b2)
            r1 = np.abs(kernel_bias(first)[0]).reshape(-1, channels).max(axis=0)
            report.append(
                {
                    "layers": [first.name, second.name],
                    "channel_range_spread_before": round(spread_before, 3),
                    "channel_range_spread_after": round(float(r1.max() / max(r1.min(), 1e-12)), 3),
                }
            )
        return report

    @staticmethod
    def _scale_shift(bn) -> tuple[np.ndarray, np.ndarray]:
        mean, var = _np(bn.moving_mean), _np(bn.moving_variance)
        gamma = _np(bn.gamma) if bn.gamma is not None else np.ones_like(mean)
        beta = _np(bn.beta) if bn.beta is not None else np.zeros_like(mean)
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
            ev = ctx.load_data("evaluation")
            x = ev.x[:64].astype(np.float32)
        except Exception:
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
