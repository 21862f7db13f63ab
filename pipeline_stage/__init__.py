"""pipeline-stage: MLflow model -> YAML chain of pluggy plugins -> TFLite -> gates -> MLflow.

Plugins import what they need from here::

    from pipeline_stage import hookimpl, Step, Phase, Params
"""

from pipeline_stage.hookspecs import hookimpl
from pipeline_stage.steps import ConversionSettings, Params, Phase, Step, StepContext

__version__ = "0.1.0"

__all__ = ["hookimpl", "Step", "Phase", "Params", "ConversionSettings", "StepContext", "__version__"]
