"""The manifest: one YAML file, checked whole before any heavy work starts.

Everything a run needs is validated here, without TensorFlow: YAML syntax, field names and
types (with did-you-mean for unknown keys), step names against the installed plugins, each step's
params against its own schema, the chain's phase order, metric names, search moves, which data sets
the chain needs, and the shape of every URI. Errors name the file, the line and the field.

``schema`` holds the pydantic models, ``yaml_text`` the safe YAML reading, ``loader`` the
validation against the installed plugins, ``data_checks`` the checks against the data, and
``loaded`` the validated manifest they produce.
"""

from pipeline_stage.contract.gates import GATE_RULES, Gate
from pipeline_stage.manifest.data_checks import local_data_path
from pipeline_stage.manifest.loaded import LoadedManifest
from pipeline_stage.manifest.loader import (
    load_manifest,
    parse_chain_item,
    parse_manifest,
    parse_steps,
)
from pipeline_stage.manifest.schema import DATA_SETS, Manifest, SearchSpec, check_model_uri, manifest_json_schema

__all__ = [
    "DATA_SETS",
    "GATE_RULES",
    "Gate",
    "LoadedManifest",
    "Manifest",
    "SearchSpec",
    "check_model_uri",
    "load_manifest",
    "local_data_path",
    "manifest_json_schema",
    "parse_chain_item",
    "parse_manifest",
    "parse_steps",
]
