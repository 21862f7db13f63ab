"""Shared fixtures: a real MLflow server on loopback, and the digits CNN trained once per session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from pipeline_stage.host import plugin_host as plugin_host

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "manifests" / "examples"
MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start `mlflow server` (sqlite backend, proxied local artifacts) on 127.0.0.1; wait until healthy."""
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / "server.log", "ab")
    # Its own session, so the uvicorn workers die with it (killpg below).
    proc = subprocess.Popen(
        [
            MLFLOW,
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            if requests.get(f"{uri}/health", timeout=2).status_code == 200:
                return proc, uri
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"mlflow server did not become healthy: {(root / 'server.log').read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """URI of a real MLflow tracking server for the whole session."""
    proc, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
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
    plugin_host._host = None
    yield
    plugin_host._host = None


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
