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
