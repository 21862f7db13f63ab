"""The graph walks and weight arithmetic of the built-in `fuse` step (see :mod:`pipeline_stage_plugins.fuse`)."""

from __future__ import annotations

from typing import Any

import numpy as np

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


def as_float64(v: Any) -> np.ndarray:
    return np.asarray(v.numpy() if hasattr(v, "numpy") else v, dtype=np.float64)


def act_name(layer) -> str | None:
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


def flatten_tile(flatten) -> int:
    """How many times each channel repeats in a (channels-last) Flatten's output."""
    shape = flatten.input.shape
    return int(np.prod(shape[1:-1])) if len(shape) > 2 else 1


class FoldGraph:
    """A model's layer graph as it is after the foldings so far: who feeds and who uses each layer,
    through the BatchNorms already folded away (`dropped`). One per `fuse` call."""

    def __init__(self, model, graph: dict[str, Any]):
        self.model, self.dropped = model, set()
        self.specs = {spec["name"]: spec for spec in graph["layers"]}
        self.consumers: dict[str, list[str]] = {name: [] for name in self.specs}
        for spec in graph["layers"]:
            for name in spec["inbound"]:
                self.consumers[name].append(spec["name"])
        for name in graph["outputs"]:
            self.consumers[name].append(OUTPUT)

    def inbound(self, name: str) -> str | None:
        """The one layer feeding `name` (through folded-away BNs), or None for several inputs."""
        ins = self.specs[name]["inbound"]
        if len(ins) != 1:
            return None
        prev = ins[0]
        while prev in self.dropped:
            prev = self.specs[prev]["inbound"][0]
        return prev

    def users(self, name: str) -> list[str]:
        """The layers (or OUTPUT) that use `name`'s output, through folded-away BNs."""
        out = []
        for user in self.consumers[name]:
            out.extend(self.users(user) if user in self.dropped else [user])
        return out

    def layer(self, name: str | None):
        if name is None or name == OUTPUT or self.specs[name]["class_name"] == "InputLayer":
            return None
        return self.model.get_layer(name)

    def producer(self, prev: str | None, bn: str):
        """The linear layer whose (ReLU-like) activated output only the BN uses, and that activation."""
        layer = self.layer(prev)
        if layer is None or self.users(prev) != [bn]:
            return None, None
        if type(layer).__name__ in LINEAR:
            return layer, act_name(layer)
        act = act_name(layer)
        lin_name = self.inbound(prev)
        linear = self.layer(lin_name)
        if (
            act is not None
            and linear is not None
            and type(linear).__name__ in LINEAR
            and act_name(linear) == "linear"
            and self.users(lin_name) == [prev]
        ):
            return linear, act
        return None, None

    def shift_target(self, bn: str):
        """The next linear layer that can absorb a per-channel shift exactly, and how to tile it."""
        tile, cur = 1, bn
        while True:
            users = self.users(cur)
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
            layer = self.layer(users[0])
            cls = type(layer).__name__
            if cls in SHIFT_TRANSPARENT:
                tile = flatten_tile(layer) if cls == "Flatten" else tile
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

    def chain(self, graph) -> list | None:
        """The kept layers in order when they form a single chain, else None."""
        kept = [
            spec["name"] for spec in graph["layers"] if spec["class_name"] != "InputLayer" and spec["name"] not in self.dropped
        ]
        for name in kept:
            if self.inbound(name) is None or len([u for u in self.users(name) if u != OUTPUT]) > 1:
                return None
        return [self.model.get_layer(name) for name in kept]


def equalize(kept, weights, kernel_bias, set_kernel_bias, passes: int = 4) -> list[dict[str, Any]]:
    """Cross-layer equalization over each linear -> ReLU-like -> (pooling, flatten, dropout) ->
    linear pair in the chain; returns the pairs with their range spread before and after."""
    pairs = []
    for i, first in enumerate(kept):
        if type(first).__name__ not in ("Conv2D", "Dense"):
            continue
        act = act_name(first)
        j = i + 1
        if (
            act == "linear"
            and j < len(kept)
            and act_name(kept[j]) in ("relu", "leaky_relu")
            and type(kept[j]).__name__ not in LINEAR
        ):
            act, j = act_name(kept[j]), j + 1
        if act not in ("relu", "leaky_relu"):
            continue
        tile = 1
        while (
            j < len(kept) and type(kept[j]).__name__ in SHIFT_TRANSPARENT and type(kept[j]).__name__ != "GlobalAveragePooling2D"
        ):
            tile = flatten_tile(kept[j]) if type(kept[j]).__name__ == "Flatten" else tile
            j += 1
        if j < len(kept) and type(kept[j]).__name__ in ("Conv2D", "Dense") and (tile == 1 or type(kept[j]).__name__ == "Dense"):
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
