"""Built-in model source `tflite`: a float ``.tflite`` file, as exporters and vendors ship it.

The file is its own float conversion; the baseline's reference is the file as shipped, run with the
LiteRT interpreter. ``model`` steps have nothing to edit (they need the framework's model), and
quantizing it takes an engine that works on a float ``.tflite`` (the LiteRT Quantizer).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_stage import InputError, ModelSource, TFLiteModel, first_line, hookimpl, read_flatbuffer, tflite_predict_batch


class TFLiteSource(ModelSource):
    """A float .tflite flatbuffer."""

    name = "tflite"
    title = "a .tflite file"
    suffixes = (".tflite",)

    def __init__(self, info, path: Path, model_bytes: bytes):
        super().__init__(info, path)
        self.model_bytes = model_bytes

    @classmethod
    def locate(cls, root: Path) -> Path | None:
        if root.is_file():
            return root if root.suffix == ".tflite" else None
        found = sorted(root.rglob("*.tflite"))
        return found[0] if found else None

    @classmethod
    def open(cls, path: Path, info, options) -> "TFLiteSource":
        """The bytes of the file, refused when it is not a float model the stage can optimize."""
        data = path.read_bytes()
        try:
            model = read_flatbuffer(data)
        except Exception as exc:  # not a flatbuffer at all
            raise InputError(
                f"model `{info.uri}` ({path.name}) is not a readable .tflite flatbuffer: {first_line(exc)}"
            ) from None
        integer = sorted(d for d in model.activation_dtypes() if d in ("INT8", "UINT8", "INT16"))
        if integer:
            raise InputError(
                f"model `{info.uri}` ({path.name}) is already quantized ({', '.join(integer)} activations)",
                hint="give the float .tflite it was made from (or the Keras / SavedModel model)",
            )
        return cls(info, path, data)

    def _runtime(self) -> TFLiteModel:
        if "runtime" not in self.cache:
            self.cache["runtime"] = TFLiteModel(self.model_bytes, threads=os.cpu_count() or 1)
        return self.cache["runtime"]

    @property
    def input_names(self) -> list[str]:
        return self._runtime().input_names

    @property
    def output_names(self) -> list[str]:
        return self._runtime().output_names

    @property
    def input_shapes(self) -> dict[str, tuple]:
        return self._runtime().input_shapes

    def predict_batch(self, inputs, model: Any = None) -> dict[str, np.ndarray]:
        return tflite_predict_batch(self._runtime(), inputs, self.output_names)

    def to_float_tflite(self, conversion, model: Any, log_path: Path) -> bytes:
        return self.model_bytes  # the file is its own float conversion


@hookimpl
def register_sources(register):
    register(TFLiteSource)
