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
    "QuantizationRequest": ("pipeline_stage.contract.steps", "QuantizationRequest"),
    "ModelSource": ("pipeline_stage.contract.sources", "ModelSource"),
    "SourceOptions": ("pipeline_stage.contract.sources", "SourceOptions"),
    "QuantizationEngine": ("pipeline_stage.contract.engines", "QuantizationEngine"),
    "QuantizationJob": ("pipeline_stage.contract.engines", "QuantizationJob"),
    "AcceleratorCompiler": ("pipeline_stage.contract.compilers", "AcceleratorCompiler"),
    "Compiled": ("pipeline_stage.contract.compilers", "Compiled"),
    "CompileRejected": ("pipeline_stage.contract.compilers", "CompileRejected"),
    "Partition": ("pipeline_stage.contract.compilers", "Partition"),
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
    "first_line": ("pipeline_stage.contract.errors", "first_line"),
    # a plugin's own tests: run with a chosen set of plugins
    "use_plugins": ("pipeline_stage.host.plugin_host", "use_plugins"),
    # engine helpers a plugin may use
    "read_flatbuffer": ("pipeline_stage.engine.flatbuffer", "read"),
    "load_flatbuffer": ("pipeline_stage.engine.flatbuffer", "load_model"),
    "dump_flatbuffer": ("pipeline_stage.engine.flatbuffer", "dump_model"),
    "add_metadata": ("pipeline_stage.engine.flatbuffer", "add_metadata"),
    "op_code_name": ("pipeline_stage.engine.flatbuffer", "op_code_name"),
    "flatbuffer_text": ("pipeline_stage.engine.flatbuffer", "text"),
    "branch_nodes": ("pipeline_stage.engine.flatbuffer", "branch_nodes"),
    "float_edges": ("pipeline_stage.engine.io_edges", "float_edges"),
    "TFLiteModel": ("pipeline_stage.engine.litert_runtime", "TFLiteModel"),
    "make_interpreter": ("pipeline_stage.engine.litert_runtime", "make_interpreter"),
    "shipped_tflite_for_engines": ("pipeline_stage.engine.shipped_tflite", "engine_ready"),
    "shipped_tflite_carry_over": ("pipeline_stage.engine.shipped_tflite", "carry_over"),
    "tflite_quantization_state": ("pipeline_stage.engine.shipped_tflite", "quantization_state"),
    "tflite_predict_batch": ("pipeline_stage.engine.source_model", "tflite_predict_batch"),
    "outputs_by_name": ("pipeline_stage.engine.source_model", "outputs_by_name"),
    "build_converter": ("pipeline_stage.engine.convert", "build_converter"),
    "run_converter": ("pipeline_stage.engine.convert", "run_converter"),
    "import_tensorflow": ("pipeline_stage.engine.tf_env", "import_tf"),
    "import_heavy": ("pipeline_stage.engine.heavy_imports", "import_heavy"),
    "captured_output": ("pipeline_stage.engine.tf_env", "captured_output"),
    "layer_graph": ("pipeline_stage.engine.keras_graph", "layer_graph"),
    "rebuild": ("pipeline_stage.engine.keras_graph", "rebuild"),
    "weights_by_name": ("pipeline_stage.engine.keras_graph", "weights_by_name"),
    # fine-tuning in tf_keras (tfmot): the parent side, and what a task in the child uses
    "run_tf_keras_task": ("pipeline_stage.engine.tfmot_bridge", "run_task"),
    "load_weights_into": ("pipeline_stage.engine.tfmot_bridge", "load_weights_into"),
    "build_tf_keras_model": ("pipeline_stage.engine.tfmot_worker", "build"),
    "fine_tuning_arrays": ("pipeline_stage.engine.tfmot_worker", "training_arrays"),
    "fine_tuning_batches": ("pipeline_stage.engine.tfmot_worker", "batches"),
    "compile_for_fine_tuning": ("pipeline_stage.engine.tfmot_worker", "compile_for_fine_tuning"),
    "EpochProgress": ("pipeline_stage.engine.tfmot_worker", "EpochProgress"),
}
# Names that moved, kept for one release with a DeprecationWarning: name -> (module, attribute, use instead).
_DEPRECATED = {
    "litert_per_tensor_errors": (
        "pipeline_stage_plugins.quantize.litert_engine",
        "per_tensor_errors",
        "the `per_layer_errors` a tflite step's context gives (the engine that quantized measures it)",
    ),
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _DEPRECATED:
        import importlib
        import warnings

        module, attr, instead = _DEPRECATED[name]
        warnings.warn(
            f"`pipeline_stage.{name}` is deprecated and goes in pipeline-stage 0.2.0: use {instead}", DeprecationWarning, 2
        )
        return getattr(importlib.import_module(module), attr)
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
    from pipeline_stage.contract.compilers import AcceleratorCompiler, Compiled, CompileRejected, Partition  # noqa: F401
    from pipeline_stage.contract.data import DataLoader, Dataset  # noqa: F401
    from pipeline_stage.contract.engines import QuantizationEngine, QuantizationJob  # noqa: F401
    from pipeline_stage.contract.errors import (  # noqa: F401
        InputError,
        ManifestError,
        PluginError,
        PluginLoadError,
        StageError,
        TrackingError,
        first_line,
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
    from pipeline_stage.contract.sources import ModelSource, SourceOptions  # noqa: F401
    from pipeline_stage.contract.steps import (  # noqa: F401
        ConversionSettings,
        Params,
        Phase,
        QuantizationRequest,
        Step,
        StepContext,
    )
    from pipeline_stage.engine.convert import build_converter, run_converter  # noqa: F401
    from pipeline_stage.engine.flatbuffer import add_metadata, branch_nodes, op_code_name  # noqa: F401
    from pipeline_stage.engine.flatbuffer import dump_model as dump_flatbuffer  # noqa: F401
    from pipeline_stage.engine.flatbuffer import load_model as load_flatbuffer  # noqa: F401
    from pipeline_stage.engine.flatbuffer import read as read_flatbuffer  # noqa: F401
    from pipeline_stage.engine.flatbuffer import text as flatbuffer_text  # noqa: F401
    from pipeline_stage.engine.heavy_imports import import_heavy  # noqa: F401
    from pipeline_stage.engine.io_edges import float_edges  # noqa: F401
    from pipeline_stage.engine.keras_graph import layer_graph, rebuild, weights_by_name  # noqa: F401
    from pipeline_stage.engine.litert_runtime import TFLiteModel, make_interpreter  # noqa: F401
    from pipeline_stage.engine.shipped_tflite import carry_over as shipped_tflite_carry_over  # noqa: F401
    from pipeline_stage.engine.shipped_tflite import engine_ready as shipped_tflite_for_engines  # noqa: F401
    from pipeline_stage.engine.shipped_tflite import quantization_state as tflite_quantization_state  # noqa: F401
    from pipeline_stage.engine.source_model import outputs_by_name, tflite_predict_batch  # noqa: F401
    from pipeline_stage.engine.tf_env import captured_output  # noqa: F401
    from pipeline_stage.engine.tf_env import import_tf as import_tensorflow  # noqa: F401
    from pipeline_stage.engine.tfmot_bridge import load_weights_into  # noqa: F401
    from pipeline_stage.engine.tfmot_bridge import run_task as run_tf_keras_task  # noqa: F401
    from pipeline_stage.engine.tfmot_worker import (  # noqa: F401
        EpochProgress,
        compile_for_fine_tuning,
    )
    from pipeline_stage.engine.tfmot_worker import batches as fine_tuning_batches  # noqa: F401
    from pipeline_stage.engine.tfmot_worker import build as build_tf_keras_model  # noqa: F401
    from pipeline_stage.engine.tfmot_worker import training_arrays as fine_tuning_arrays  # noqa: F401
    from pipeline_stage.host.plugin_host import use_plugins  # noqa: F401
