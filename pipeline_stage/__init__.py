"""pipeline-stage: MLflow model -> YAML chain of pluggy plugins -> TFLite -> gates -> MLflow.

This module is the public plugin API: everything a plugin (built-in or third-party) needs is
importable from here, and a plugin imports nothing else of the package (a test holds the built-ins
to it)::

    from pipeline_stage import hookimpl, Step, Phase, Params

The engine helpers at the end (flatbuffer editing, the LiteRT interpreter, the converter, the
tf_keras bridge) are loaded on first use, so importing this module stays light.
"""

from pipeline_stage.contract.data import DataLoader, Dataset
from pipeline_stage.contract.errors import (
    InputError,
    ManifestError,
    PluginError,
    PluginLoadError,
    StageError,
    TrackingError,
)
from pipeline_stage.contract.hookspecs import hookimpl
from pipeline_stage.contract.metrics import Evaluation, Metric
from pipeline_stage.contract.moves import Chain, ModelFacts, SearchMove, TrialView, chain_text, edited, step_params
from pipeline_stage.contract.report import GateResult, ObserverContext, Registered, Report, StepRecord
from pipeline_stage.contract.steps import ConversionSettings, Params, Phase, Step, StepContext
from pipeline_stage.version import __version__

# name -> (module, attribute): engine helpers a plugin may use, imported on first access.
_LAZY = {
    "read_flatbuffer": ("pipeline_stage.engine.flatbuffer", "read"),
    "load_flatbuffer": ("pipeline_stage.engine.flatbuffer", "load_model"),
    "dump_flatbuffer": ("pipeline_stage.engine.flatbuffer", "dump_model"),
    "add_metadata": ("pipeline_stage.engine.flatbuffer", "add_metadata"),
    "op_code_name": ("pipeline_stage.engine.flatbuffer", "op_code_name"),
    "flatbuffer_text": ("pipeline_stage.engine.flatbuffer", "text"),
    "TFLiteModel": ("pipeline_stage.engine.litert_runtime", "TFLiteModel"),
    "build_converter": ("pipeline_stage.engine.convert", "build_converter"),
    "import_tensorflow": ("pipeline_stage.engine.tf_env", "import_tf"),
    "captured_output": ("pipeline_stage.engine.tf_env", "captured_output"),
    "layer_graph": ("pipeline_stage.engine.keras_graph", "layer_graph"),
    "rebuild": ("pipeline_stage.engine.keras_graph", "rebuild"),
    "run_tf_keras_task": ("pipeline_stage.engine.tfmot_bridge", "run_task"),
    "load_weights_into": ("pipeline_stage.engine.tfmot_bridge", "load_weights_into"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipeline_stage' has no attribute {name!r}")


__all__ = [
    "__version__",
    # plugin hooks and the contract
    "hookimpl",
    "Step",
    "Params",
    "Phase",
    "StepContext",
    "ConversionSettings",
    "Metric",
    "Evaluation",
    "DataLoader",
    "Dataset",
    "SearchMove",
    "Chain",
    "ModelFacts",
    "TrialView",
    "chain_text",
    "step_params",
    "edited",
    # what observers receive
    "ObserverContext",
    "StepRecord",
    "GateResult",
    "Registered",
    "Report",
    # errors
    "StageError",
    "InputError",
    "ManifestError",
    "PluginError",
    "PluginLoadError",
    "TrackingError",
    # engine helpers
    *_LAZY,
]
