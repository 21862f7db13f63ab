"""A Keras 3 model as a plain graph of layers (name, class, config, inbound layer names), and the
way back: rebuild it with some layers dropped or changed. `fuse` edits graphs this way; the tf_keras
bridge ships the same description to its child process."""

from __future__ import annotations

from typing import Any

from pipeline_stage.contract.errors import InputError


def _keras_tensors(obj: Any):
    """The (layer, node, tensor) histories inside a Keras 3 inbound-node structure."""
    if isinstance(obj, dict):
        if obj.get("class_name") == "__keras_tensor__":
            yield obj["config"]["keras_history"]
        else:
            for v in obj.values():
                yield from _keras_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _keras_tensors(v)


def layer_graph(model, *, purpose: str) -> dict[str, Any]:
    """``{"name", "layers": [{"name", "class_name", "config", "inbound"}], "outputs"}``, inputs first,
    in topological order. A Sequential model gets an explicit input layer named ``input``.

    :raises InputError: for a nested model or a layer called more than once (`purpose` says who needs it).
    """
    config = model.get_config()
    graph: dict[str, Any] = {"name": model.name, "layers": [], "outputs": []}
    sequential = type(model).__name__ == "Sequential"
    previous = None
    if sequential:
        graph["layers"].append(
            {"name": "input", "class_name": "InputLayer", "config": {"batch_shape": list(model.inputs[0].shape)}, "inbound": []}
        )
        previous = "input"
    for entry in config.get("layers", []):
        cls, cfg = entry["class_name"], entry["config"]
        name = cfg.get("name") or entry.get("name")
        if cls in ("Sequential", "Functional", "Model"):
            raise InputError(
                f"layer `{name}` is a nested model; {purpose} needs a flat model",
                hint="flatten the model before logging it (build one functional model of layers)",
            )
        if sequential:
            if cls == "InputLayer":
                continue
            inbound = [previous]
        else:
            nodes = entry.get("inbound_nodes", [])
            if len(nodes) > 1:
                raise InputError(
                    f"layer `{name}` is shared (called {len(nodes)} times); {purpose} needs each layer called once",
                    hint="give each call its own layer",
                )
            inbound = [h[0] for h in _keras_tensors(nodes)]
        graph["layers"].append({"name": name, "class_name": cls, "config": cfg, "inbound": inbound})
        previous = name
    if sequential:
        graph["outputs"] = [previous]
    else:
        outs = config["output_layers"]
        graph["outputs"] = [outs[0]] if isinstance(outs[0], str) else [o[0] for o in outs]
    return graph


def weights_by_name(layers) -> dict[str, Any]:
    """Every layer's weights keyed ``layer/i``: how the tf_keras bridge ships them both ways."""
    return {f"{layer.name}/{i}": w for layer in layers for i, w in enumerate(layer.get_weights())}


def assign_weights(layers, saved) -> None:
    """Set each layer's weights from `saved` (a mapping keyed as weights_by_name writes it)."""
    for layer in layers:
        count = len(layer.get_weights())
        if count:
            layer.set_weights([saved[f"{layer.name}/{i}"] for i in range(count)])


def wire(graph: dict[str, Any], make_input, make_layer):
    """Call `graph`'s layers on each other's outputs, in order, with any Keras flavour.

    ``make_input(spec, k)`` makes the k-th input tensor; ``make_layer(spec)`` makes a layer, or
    None to pass its (single) input through. Returns the inputs and outputs (a tensor each when
    there is one, as keras.Model takes them) and the layers made, by name.
    """
    tensors: dict[str, Any] = {}
    inputs, layers = [], {}
    for spec in graph["layers"]:
        name = spec["name"]
        if spec["class_name"] == "InputLayer":
            tensors[name] = t = make_input(spec, len(inputs))
            inputs.append(t)
            continue
        args = [tensors[n] for n in spec["inbound"]]
        layer = make_layer(spec)
        if layer is None:
            tensors[name] = args[0]
            continue
        tensors[name] = layer(args if len(args) > 1 else args[0])
        layers[name] = layer
    outputs = [tensors[n] for n in graph["outputs"]]
    return inputs if len(inputs) > 1 else inputs[0], outputs if len(outputs) > 1 else outputs[0], layers


def rebuild(model, graph: dict[str, Any], *, dropped: set[str], configs: dict[str, dict], weights: dict[str, list]):
    """A new Keras model from `graph`: layers in `dropped` pass their input through (they must have
    one), others are rebuilt from `configs` (default: their own) with `weights` (default: their own)."""
    import keras
    import numpy as np

    def make_input(spec, k):
        source = model.inputs[k]
        return keras.Input(shape=source.shape[1:], dtype=source.dtype, name=source.name)

    def make_layer(spec):
        if spec["name"] in dropped:
            return None
        old = model.get_layer(spec["name"])
        return type(old).from_config(configs.get(spec["name"], old.get_config()))

    inputs, outputs, layers = wire(graph, make_input, make_layer)
    out = keras.Model(inputs, outputs, name=model.name)
    for name, layer in layers.items():
        source = weights[name] if weights.get(name) is not None else model.get_layer(name).get_weights()
        if source:
            layer.set_weights([np.asarray(v, dtype=np.float32) for v in source])
    return out
