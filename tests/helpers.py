"""Helpers for the tests: run the CLI in-process, read registered versions."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from pipeline_stage.cli import cli


def invoke(*args: str):
    """Run `pipeline-stage ARGS` in this process (TensorFlow stays imported between tests)."""
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def versions_of(name: str) -> list:
    import mlflow

    return mlflow.MlflowClient().search_model_versions(f"name='{name}'")


def read_report(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def digits_manifest(register_name: str) -> str:
    """The digits CNN from the session's source (`digits-cnn@champion`), dynamic range, one accuracy
    gate, registered as `register_name` with alias `prod`: the run the fault tests break."""
    return (
        "model: models:/digits-cnn@champion\n"
        "data: {evaluation: 'runs:/${source.run_id}/data/eval.npz'}\n"
        "chain:\n  - quantize: {mode: dynamic}\n"
        "gates:\n  - {metric: accuracy, max_drop: 0.02}\n"
        f"register: {{name: {register_name}, alias: prod}}\n"
    )
