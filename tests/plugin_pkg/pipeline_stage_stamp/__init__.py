"""An example third-party plugin: a `tflite`-phase step that stamps metadata into the model."""

from pydantic import Field

from pipeline_stage import Params, Phase, Step, add_metadata, hookimpl


class StampParams(Params):
    value: str = Field(description="Text stored in the model's metadata.")
    key: str = Field("build_stamp", description="Metadata entry name.")


class Stamp(Step):
    """Write a metadata entry (e.g. a build id) into the .tflite flatbuffer."""

    name = "stamp"
    phase = Phase.TFLITE
    Params = StampParams

    def apply(self, model_bytes, ctx):
        ctx.tags[f"stamp.{self.params.key}"] = self.params.value
        ctx.notes["stamped"] = self.params.key
        return add_metadata(model_bytes, self.params.key, self.params.value.encode())


@hookimpl
def register_steps(register):
    register(Stamp)
