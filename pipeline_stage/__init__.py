"""pipeline-stage: MLflow model -> YAML chain of pluggy plugins -> TFLite -> gates -> MLflow.

This module is the public plugin API: everything a plugin (built-in or third-party) needs is
importable from here, and a plugin imports nothing else of the package (a test holds the built-ins
to it)::

    from pipeline_stage import hookimpl, Step, Phase, Params

Every name is loaded on first use, so importing the package (which every submodule import does,
`pipeline-stage --help` included) costs nothing; the engine helpers at the end load TensorFlow or
LiteRT only when they are called.
"""

from typing import TYPE_CHECKING

from pipeline_stage.version import __version__

# name -> (module, attribute)
_PUBLIC = {
    # plugin hooks and the contract
    "hookimpl": ("pipeline_stage.contract.hookspecs", "hookimpl"),
    "Step": ("pipeline_stage.contract.steps", "Step"),
    "Params": ("pipeline_stage.contract.steps", "Params"),
    "Phase": ("pipeline_stage.contract.steps", "Phase"),
    "StepContext": ("pipeline_stage.contract.steps", "StepContext"),
    "ConversionSettings": ("pipeline_stage.contract.steps", "ConversionSettings"),
    "Metric": ("pipeline_stage.contract.metrics", "Metric"),
    "Evaluation": ("pipeline_stage.contract.metrics", "Evaluation"),
    "DataLoader": ("pipeline_stage.contract.data", "DataLoader"),
    "Dataset": ("pipeline_stage.contract.data", "Dataset"),
    "SearchMove": ("pipeline_stage.contract.moves", "SearchMove"),
    "Chain": ("pipeline_stage.contract.moves", "Chain"),
    "ModelFacts": ("pipeline_stage.contract.moves", "ModelFacts"),
    "TrialView": ("pipeline_stage.contract.moves", "TrialView"),
    "chain_text": ("pipeline_stage.contract.moves", "chain_text"),
    "step_params": ("pipeline_stage.contract.moves", "step_params"),
    "edited": ("pipeline_stage.contract.moves", "edited"),
    # what observers receive
    "ObserverContext": ("pipeline_stage.contract.report", "ObserverContext"),
    "StepRecord": ("pipeline_stage.contract.report", "StepRecord"),
    "GateResult": ("pipeline_stage.contract.report", "GateResult"),
    "Registered": ("pipeline_stage.contract.report", "Registered"),
    "Report": ("pipeline_stage.contract.report", "Report"),
    # errors
    "StageError": ("pipeline_stage.contract.errors", "StageError"),
    "InputError": ("pipeline_stage.contract.errors", "InputError"),
    "ManifestError": ("pipeline_stage.contract.errors", "ManifestError"),
    "PluginError": ("pipeline_stage.contract.errors", "PluginError"),
    "PluginLoadError": ("pipeline_stage.contract.errors", "PluginLoadError"),
    "TrackingError": ("pipeline_stage.contract.errors", "TrackingError"),
    # a plugin's own tests: run with a chosen set of plugins
    "use_plugins": ("pipeline_stage.host.plugin_host", "use_plugins"),
    # engine helpers a plugin may use
    "read_flatbuffer": ("pipeline_stage.engine.flatbuffer", "read"),
    "load_flatbuffer": ("pipeline_stage.engine.flatbuffer", "load_model"),
    "dump_flatbuffer": ("pipeline_stage.engine.flatbuffer", "dump_model"),
    "add_metadata": ("pipeline_stage.engine.flatbuffer", "add_metadata"),
    "op_code_name": ("pipeline_stage.engine.flatbuffer", "op_code_name"),
    "flatbuffer_text": ("pipeline_stage.engine.flatbuffer", "text"),
    "TFLiteModel": ("pipeline_stage.engine.litert_runtime", "TFLiteModel"),
    "build_converter": ("pipeline_stage.engine.convert", "build_converter"),
    "litert_per_tensor_errors": ("pipeline_stage.engine.litert_quantize", "per_tensor_errors"),
    "import_tensorflow": ("pipeline_stage.engine.tf_env", "import_tf"),
    "captured_output": ("pipeline_stage.engine.tf_env", "captured_output"),
    "layer_graph": ("pipeline_stage.engine.keras_graph", "layer_graph"),
    "rebuild": ("pipeline_stage.engine.keras_graph", "rebuild"),
    "run_tf_keras_task": ("pipeline_stage.engine.tfmot_bridge", "run_task"),
    "load_weights_into": ("pipeline_stage.engine.tfmot_bridge", "load_weights_into"),
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        module, attr = _PUBLIC[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipeline_stage' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for editors and type checkers: the same names, imported eagerly
    from pipeline_stage.contract.data import DataLoader, Dataset  # noqa: F401
    from pipeline_stage.contract.errors import (  # noqa: F401
        InputError,
        ManifestError,
        PluginError,
        PluginLoadError,
        StageError,
        TrackingError,
    )
    from pipeline_stage.contract.hookspecs import hookimpl  # noqa: F401
    from pipeline_stage.contract.metrics import Evaluation, Metric  # noqa: F401
    from pipeline_stage.contract.moves import (  # noqa: F401
        Chain,
        ModelFacts,
        SearchMove,
        TrialView,
        chain_text,
        edited,
        step_params,
    )
    from pipeline_stage.contract.report import GateResult, ObserverContext, Registered, Report, StepRecord  # noqa: F401
    from pipeline_stage.contract.steps import ConversionSettings, Params, Phase, Step, StepContext  # noqa: F401
    from pipeline_stage.engine.convert import build_converter  # noqa: F401
    from pipeline_stage.engine.flatbuffer import add_metadata, op_code_name  # noqa: F401
    from pipeline_stage.engine.flatbuffer import dump_model as dump_flatbuffer  # noqa: F401
    from pipeline_stage.engine.flatbuffer import load_model as load_flatbuffer  # noqa: F401
    from pipeline_stage.engine.flatbuffer import read as read_flatbuffer  # noqa: F401
    from pipeline_stage.engine.flatbuffer import text as flatbuffer_text  # noqa: F401
    from pipeline_stage.engine.keras_graph import layer_graph, rebuild  # noqa: F401
    from pipeline_stage.engine.litert_quantize import per_tensor_errors as litert_per_tensor_errors  # noqa: F401
    from pipeline_stage.engine.litert_runtime import TFLiteModel  # noqa: F401
    from pipeline_stage.engine.tf_env import captured_output  # noqa: F401
    from pipeline_stage.engine.tf_env import import_tf as import_tensorflow  # noqa: F401
    from pipeline_stage.engine.tfmot_bridge import load_weights_into  # noqa: F401
    from pipeline_stage.engine.tfmot_bridge import run_task as run_tf_keras_task  # noqa: F401
    from pipeline_stage.host.plugin_host import use_plugins  # noqa: F401
