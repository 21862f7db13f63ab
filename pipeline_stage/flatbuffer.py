"""Kept so that plugins written against 0.1's README (``from pipeline_stage.flatbuffer import
add_metadata``) keep working; new code imports the helpers from :mod:`pipeline_stage`
(``add_metadata``, ``read_flatbuffer``, ...). The module itself is :mod:`pipeline_stage.engine.flatbuffer`."""

from pipeline_stage.engine.flatbuffer import *  # noqa: F403
from pipeline_stage.engine.flatbuffer import add_metadata, dump_model, load_model, op_code_name, read, text  # noqa: F401
