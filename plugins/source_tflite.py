"""Built-in model source `tflite`: a float ``.tflite`` file, as exporters and vendors ship it.

The file as shipped is the baseline: its size, its outputs, its latency, run with the LiteRT
interpreter (a file without a SignatureDef names its inputs and outputs after their tensors; a
file with several takes the manifest's `signature:`; inputs with a fixed batch are fed that many
samples a call). What a quantization engine reads is the same model rewritten exactly where the
file is written in ways engines cannot read (`shipped_tflite_for_engines`: older operator codes,
no SignatureDef, float16 or sparse weights, the int8 weights of a weight-quantized model), and
what the chain makes of it gets the file's TFLite metadata and associated files back. A custom op
the interpreter cannot run is refused at once, naming the op, unless a plugin registers its kernel
(the `register_op_resolvers` hook). `model` steps have nothing to edit (they need the framework's
model).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_stage import (
    InputError,
    ModelSource,
    TFLiteModel,
    first_line,
    hookimpl,
    read_flatbuffer,
    shipped_tflite_carry_over,
    shipped_tflite_for_engines,
    tflite_predict_batch,
    tflite_quantization_state,
)

QUANTIZED = {
    "integer": "already fully quantized (integer activations)",
    "weights": "already weight-quantized (integer weights, float activations)",
}


class TFLiteSource(ModelSource):
    """A .tflite flatbuffer as shipped: float, float16 or sparse weights, with or without signatures."""

    name = "tflite"
    title = "a .tflite file"
    suffixes = (".tflite",)
    takes_signature = True

    def __init__(self, info, path: Path, model_bytes: bytes, signature: str | None):
        super().__init__(info, path)
        self.model_bytes = model_bytes
        self.signature = signature

    @classmethod
    def locate(cls, root: Path) -> Path | None:
        if root.is_file():
            return root if root.suffix == ".tflite" else None
        found = sorted(root.rglob("*.tflite"))
        return found[0] if found else None

    @classmethod
    def open(cls, path: Path, info, options) -> "TFLiteSource":
        """The file's bytes, once the interpreter can run it (its custom ops resolved)."""
        data = path.read_bytes()
        try:
            model = read_flatbuffer(data)
        except Exception as exc:  # not a flatbuffer at all
            raise InputError(
                f"model `{info.uri}` ({path.name}) is not a readable .tflite flatbuffer: {first_line(exc)}"
            ) from None
        signatures = model.signatures
        signature = None if options.signature == "serving_default" and "serving_default" not in signatures else options.signature
        if signature is not None and signatures and signature not in signatures:
            raise InputError(
                f"model `{info.uri}` has no signature `{signature}` (signatures: {', '.join(signatures)})",
                hint="set `signature:` in the manifest to one of them",
            )
        source = cls(info, path, data, signature if signatures else None)
        source._runtime()  # a custom op without a kernel fails here, before any work
        state = tflite_quantization_state(data)
        if state != "float":
            source.already_quantized = state
            source.notes.append(
                f"`{path.name}` is {QUANTIZED[state]}"
                + (
                    ": its float weights are recovered from the int8 ones for the engines"
                    if state == "weights"
                    else ": tflite steps run on it; quantizing again is refused"
                )
            )
        if not signatures:
            source.notes.append(f"`{path.name}` has no SignatureDef: inputs and outputs are named after their tensors")
        feeding = source._runtime().feeding()
        if feeding:
            source.notes.append(f"fed {feeding}")
        return source

    def _runtime(self) -> TFLiteModel:
        if "runtime" not in self.cache:
            try:
                runtime = TFLiteModel(self.model_bytes, threads=os.cpu_count() or 1, signature=self.signature)
                runtime.interpreter.allocate_tensors()  # where an op without a kernel fails
                self.cache["runtime"] = runtime
            except (ValueError, RuntimeError) as exc:
                text = str(exc)
                if "unresolved custom op" not in text:
                    raise InputError(
                        f"model `{self.info.uri}` cannot be run by the LiteRT interpreter: {first_line(exc)}"
                    ) from None
                op = text.split("unresolved custom op:", 1)[1].strip().split()[0].rstrip(".")
                raise InputError(
                    f"model `{self.info.uri}` uses custom op `{op}`, which the LiteRT interpreter cannot run: "
                    "no installed plugin registers its kernel",
                    hint="install the plugin that provides it (a `register_op_resolvers(register)` hook; "
                    "`pipeline-stage plugins` lists the custom ops installed), or give a model without it",
                ) from None
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
        return self.model_bytes  # the file as shipped is its own float conversion: the baseline

    def for_engines(self, float_tflite: bytes) -> bytes:
        prepared = shipped_tflite_for_engines(float_tflite, self.signature)
        self.notes.extend(n for n in prepared.notes if n not in self.notes)
        return prepared.model_bytes

    def carry_over(self, converted: bytes) -> bytes:
        out, notes = shipped_tflite_carry_over(self.model_bytes, converted)
        self.notes.extend(n for n in notes if n not in self.notes)
        return out


@hookimpl
def register_sources(register):
    register(TFLiteSource)
