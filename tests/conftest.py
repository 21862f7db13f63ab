"""Shared fixtures: a real MLflow server on loopback (PostgreSQL + S3), and the digits CNN trained once per session."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline_stage.host import plugin_host as plugin_host
from tests import helpers
from tests.services import S3, Postgres, production_server, stop_server


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster on loopback for the session (tests/services.py)."""
    pg = Postgres()
    try:
        yield pg
    finally:
        pg.stop()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 server on loopback for the session."""
    store = S3(tmp_path_factory.mktemp("s3"))
    try:
        yield store
    finally:
        store.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, postgres, s3):
    """URI of a real MLflow tracking server for the whole session: PostgreSQL behind it, artifacts
    proxied to S3 (the shape production runs; the embedded sqlite store has tests of its own)."""
    proc, uri = production_server(tmp_path_factory.mktemp("mlflow-server"), postgres, s3, "mlflow-session")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
        stop_server(proc)


@pytest.fixture(scope="session")
def direct(tmp_path_factory, postgres, s3, digits_model, digits_data):
    """A server on PostgreSQL that stores no files: clients write to bucket `direct` themselves.
    The digits source is logged to it from this process, with the same S3 environment."""
    from pipeline_stage.demo import log_source_model

    proc, uri = production_server(tmp_path_factory.mktemp("direct"), postgres, s3, "direct", direct=True)
    with helpers.pointed_at(uri, s3.env):
        log_source_model(digits_model, digits_data, name="digits-direct", alias="champion")
    yield uri, s3
    stop_server(proc)


@pytest.fixture(scope="session")
def digits_data():
    from pipeline_stage.demo import digits_data as load

    return load()


@pytest.fixture(scope="session")
def digits_model(digits_data):
    from pipeline_stage.demo import train_digits_cnn

    return train_digits_cnn(digits_data)


@pytest.fixture(scope="session")
def digits_source(mlflow_server, digits_model, digits_data):
    """The digits CNN logged to the server as `digits-cnn` with alias `champion` (and its data)."""
    from pipeline_stage.demo import log_source_model

    return log_source_model(digits_model, digits_data)


@pytest.fixture(scope="session")
def collapse_source(mlflow_server):
    """The BN-after-ReLU CNN on raw 16x16 digits (pipeline_stage.demo.train_bn_after_relu_cnn), whose
    plain full-int8 conversion collapses; logged as `digits-bn-raw@champion`."""
    from pipeline_stage.demo import log_source_model, raw_digits_data, train_bn_after_relu_cnn

    data = raw_digits_data()
    model = train_bn_after_relu_cnn(data)
    return log_source_model(model, data, name="digits-bn-raw", alias="champion")


@pytest.fixture(autouse=True)
def fresh_registry():
    """Each test builds the plugin host anew (tests install and remove plugins)."""
    plugin_host.reset_host()
    yield
    plugin_host.reset_host()


@pytest.fixture(autouse=True)
def restore_tracking_uri():
    """In-process CLI runs call mlflow.set_tracking_uri, which also sets MLFLOW_TRACKING_URI."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    if "mlflow" in sys.modules and before:
        sys.modules["mlflow"].set_tracking_uri(before)


@pytest.fixture
def manifest(tmp_path):
    """The tests' one manifest builder: ``manifest(text=None, *, name="m.yaml", folder=None, **sections)``
    writes :func:`tests.helpers.manifest_yaml`'s text (the sections in the order given: a string as
    written, anything else as flow YAML) to `folder` (default the test's tmp_path); its path."""

    def write(text: str | None = None, *, name: str = "m.yaml", folder: Path | None = None, **sections: Any) -> Path:
        return helpers.write_manifest(folder or tmp_path, text, name=name, **sections)

    return write


@pytest.fixture
def run_stage(tmp_path):
    """The tests' one way to run the stage: ``run_stage(manifest, *args, report=True, output=True)``
    runs `pipeline-stage run` in this process with `--report` and `--output` in tmp_path; a
    :class:`tests.helpers.StageResult` (exit code, output, `.report`, `.model_bytes`)."""
    return functools.partial(helpers.run_stage, tmp_path)


@pytest.fixture(scope="session")
def invoke():
    """``invoke(*args)``: `pipeline-stage ARGS` in this process (validate, plugins, verify, ...)."""
    return helpers.invoke


@pytest.fixture(scope="session")
def run_cli():
    """``run_cli(*args, env=None)``: the real `pipeline-stage` executable in a process of its own."""
    return helpers.run_cli


@pytest.fixture(scope="session")
def versions_of():
    """``versions_of(name)``: the registered model's versions on the tracking server."""
    return helpers.versions_of


def pytest_terminal_summary(terminalreporter):
    """Print the reliability figures of this run (see tests/figures.py)."""
    import json

    from tests.figures import FIGURES

    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    for key in sorted(FIGURES):
        terminalreporter.write_line(f"{key}: {FIGURES[key]}")
    out = helpers.REPO / "build" / "reliability-figures.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(FIGURES, indent=2, sort_keys=True))
