"""Small in-process plugins for tests (registered with `build_host(extra_plugins=...)`)."""

from __future__ import annotations

from pipeline_stage import Phase, Step, hookimpl


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
