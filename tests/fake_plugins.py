"""Small in-process plugins for tests (registered with `build_host(extra_plugins=...)`)."""

from __future__ import annotations

import numpy as np

from pipeline_stage import (
    ModelSource,
    Phase,
    QuantizationEngine,
    Step,
    build_converter,
    hookimpl,
    run_converter,
)


class IdentityModel(Step):
    """A `model`-phase step that returns a clone of the model with the same weights."""

    name = "identity_model"
    phase = Phase.MODEL

    def apply(self, model, ctx):
        import keras

        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
        ctx.notes["cloned_layers"] = len(model.layers)
        return clone


class Explode(Step):
    """A `tflite`-phase step that raises, as a buggy plugin would."""

    name = "explode"
    phase = Phase.TFLITE

    def apply(self, model_bytes, ctx):
        raise RuntimeError("boom")


class Steps:
    @hookimpl
    def register_steps(self, register):
        register(IdentityModel)
        register(Explode)


class Recorder:
    """Records every observer hook call."""

    def __init__(self):
        self.calls: list[tuple[str, object]] = []
        self.seen: dict[str, object] = {}  # the last objects each hook received

    @hookimpl
    def before_step(self, step, index):
        self.calls.append(("before_step", (step.name, index)))

    @hookimpl
    def after_step(self, step, record, context):
        self.calls.append(("after_step", (step.name, sorted(record.metrics))))
        self.seen["after_step"] = (record, context)

    @hookimpl
    def after_gates(self, results, passed):
        self.calls.append(("after_gates", passed))
        self.seen["after_gates"] = results

    @hookimpl
    def after_register(self, registered):
        self.calls.append(("after_register", registered["uri"]))  # dict-style reads still work
        self.seen["after_register"] = registered

    @hookimpl
    def on_stage_error(self, error):
        self.calls.append(("on_stage_error", type(error).__name__))


class LinearSource(ModelSource):
    """A model kind of a team's own: a linear classifier saved as an .npz (`w`, `b`) with suffix
    `.linear`, or under an MLmodel folder whose flavor is `linear_model`. Its baseline is numpy's
    own `x @ w + b`; its float .tflite is a Keras Dense layer with the same weights."""

    name = "linear"
    title = "a linear model"
    flavors = ("linear_model",)
    suffixes = (".linear",)

    def __init__(self, info, path, w, b):
        super().__init__(info, path)
        self.w, self.b = w, b

    @classmethod
    def locate(cls, root):
        if root.is_file():
            return root if root.suffix == ".linear" else None
        found = sorted(root.rglob("*.linear"))
        return found[0] if found else None

    @classmethod
    def open(cls, path, info, options):
        with np.load(path) as saved:
            return cls(info, path, saved["w"].astype(np.float32), saved["b"].astype(np.float32))

    @property
    def input_names(self):
        return ["x"]

    @property
    def output_names(self):
        return ["scores"]

    @property
    def input_shapes(self):
        return {"x": (self.w.shape[0],)}

    def predict_batch(self, inputs, model=None):
        x = np.asarray(inputs["x"], dtype=np.float32).reshape(len(inputs["x"]), -1)
        return {"scores": x @ self.w + self.b}

    def to_float_tflite(self, conversion, model, log_path):
        import keras

        dense = keras.Sequential([keras.Input((self.w.shape[0],)), keras.layers.Dense(self.w.shape[1])])
        dense.layers[-1].set_weights([self.w, self.b])
        return run_converter(build_converter(conversion, keras_model=dense), log_path)


class LinearSources:
    @hookimpl
    def register_sources(self, register):
        register(LinearSource)


class BrokenEngine(QuantizationEngine):
    """An engine with a bug: it raises."""

    name = "acme_broken"

    def quantize(self, job):
        raise RuntimeError("the in-house quantizer fell over")


class BrokenEngines:
    @hookimpl
    def register_quantization_engines(self, register):
        register(BrokenEngine)
