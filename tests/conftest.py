"""Shared fixtures: a real MLflow server on loopback (PostgreSQL + S3), and the digits CNN trained once per session."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_stage.host import plugin_host as plugin_host
from tests.services import S3, Postgres, free_port, start_mlflow_server, stop_server  # noqa: F401 - tests import them here

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "manifests" / "examples"


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


@contextlib.contextmanager
def pointed_at(uri: str, env: dict[str, str] | None = None):
    """This process's MLflow client pointed at `uri`, with `env` set, both restored afterwards."""
    import mlflow

    before = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in (env or {}).items():
            patch.setenv(key, value)
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(before)


def production_server(root: Path, postgres: Postgres, s3: S3, name: str, *, direct: bool = False, port: int | None = None):
    """`mlflow server` on PostgreSQL (database `name`) with artifacts in S3 (bucket `name`):
    proxied by the server, or with `direct` written by the clients themselves."""
    backend, bucket = postgres.database(name.replace("-", "_")), s3.bucket(name)
    return start_mlflow_server(
        root, port, backend=backend, artifacts=f"s3://{bucket}/artifacts", direct=direct, workers=2, env=s3.env
    )


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
    with pointed_at(uri, s3.env):
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


def write_manifest(tmp_path: Path, text: str, name: str = "manifest.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real `pipeline-stage` executable."""
    exe = str(Path(sys.executable).with_name("pipeline-stage"))
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout
    )


def pytest_terminal_summary(terminalreporter):
    """Print the reliability figures of this run (see tests/figures.py)."""
    import json

    from tests.figures import FIGURES

    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    for key in sorted(FIGURES):
        terminalreporter.write_line(f"{key}: {FIGURES[key]}")
    out = REPO / "build" / "reliability-figures.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(FIGURES, indent=2, sort_keys=True))
