"""Deprecated: kept so that plugins written against 0.1's README (``from pipeline_stage.flatbuffer
import add_metadata``) keep working for this release, with a DeprecationWarning; it goes in 0.2.0
(docs/plugins.md, "Compatibility"). New code imports the helpers from :mod:`pipeline_stage`
(``add_metadata``, ``read_flatbuffer``, ...)."""

import warnings

from pipeline_stage.engine.flatbuffer import *  # noqa: F403
from pipeline_stage.engine.flatbuffer import add_metadata, dump_model, load_model, op_code_name, read, text  # noqa: F401

warnings.warn(
    "`pipeline_stage.flatbuffer` is deprecated and goes in pipeline-stage 0.2.0: import the helpers from "
    "`pipeline_stage` (add_metadata, read_flatbuffer, load_flatbuffer, dump_flatbuffer, op_code_name, flatbuffer_text)",
    DeprecationWarning,
    stacklevel=2,
)
