"""Built-in plugin `quantize`: the quantize step, its three engines and its search moves.

- :mod:`.step`: the ``quantize`` step (``convert`` phase): it asks the conversion for an engine and
  its settings; :mod:`.params` holds its params and their checks.
- :mod:`.converter_engine`: engine ``converter``, the TFLite converter quantizing while it converts
  a TensorFlow model (dynamic, int8, float16, int16x8, selective int8, and :mod:`.qat`).
- :mod:`.litert_engine`: engine ``litert``, the LiteRT Quantizer's recipes on the float ``.tflite``.
- :mod:`.pt2e_engine`: engine ``pt2e``, litert-torch's PT2E quantizer on a PyTorch source.
- :mod:`.moves`: the ``auto`` search's moves on a quantize step (the other engine, other recipes,
  other modes; keep outputs, op types or nodes float).

Remove the plugin (``PIPELINE_STAGE_DISABLE_PLUGINS``, or leave it out of the host) and all of
this goes with it: the stage still runs float chains.
"""

from __future__ import annotations

from pipeline_stage import hookimpl
from pipeline_stage_plugins.quantize.converter_engine import ConverterEngine
from pipeline_stage_plugins.quantize.litert_engine import LiteRTEngine
from pipeline_stage_plugins.quantize.moves import (
    KeepFloatNodes,
    KeepFloatOps,
    KeepFloatOutputs,
    LiteRTRecipes,
    OtherEngine,
    OtherModes,
)
from pipeline_stage_plugins.quantize.pt2e_engine import PT2EEngine
from pipeline_stage_plugins.quantize.step import Quantize


@hookimpl
def register_quantization_engines(register):
    register(ConverterEngine)
    register(LiteRTEngine)
    register(PT2EEngine)


@hookimpl
def register_steps(register):
    register(Quantize)


@hookimpl
def register_search_moves(register):
    register(OtherEngine)
    register(OtherModes)
    register(LiteRTRecipes)
    register(KeepFloatOutputs)
    register(KeepFloatOps)
    register(KeepFloatNodes)
