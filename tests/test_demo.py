"""The README's first command: `pipeline-stage demo` on a fresh directory with no tracking server."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path


def test_demo_uses_a_local_store_and_registers_an_int8_model(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    exe = str(Path(sys.executable).with_name("pipeline-stage"))
    result = subprocess.run([exe, "demo", "--epochs", "8"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for needle in (
        "accuracy",
        "size_bytes",
        "latency_p50_ms",
        "registered: models:/digits-cnn-tflite/1",
        "mlflow ui --backend-store-uri sqlite:///mlflow.db",
        "pass",
    ):
        assert needle in out, out
    assert (tmp_path / "mlflow.db").is_file()
    report = json.loads((tmp_path / "demo-report.json").read_text())
    assert report["passed"] and report["registered"]["alias"] == "edge-candidate"
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        aliases = db.execute("select name, alias, version from registered_model_aliases").fetchall()
    assert ("digits-cnn", "champion", 1) in aliases and ("digits-cnn-tflite", "edge-candidate", 1) in aliases


def test_demo_search_case_finds_a_passing_chain(tmp_path):
    """`pipeline-stage demo --case search`: the example of docs/search.md, end to end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    exe = str(Path(sys.executable).with_name("pipeline-stage"))
    result = subprocess.run([exe, "demo", "--case", "search"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "registered: models:/digits-bn-raw-tflite/1" in result.stdout
    assert "[search] trial 1/12 [as written]" in result.stderr and "FAILED" in result.stderr
    report = json.loads((tmp_path / "demo-report.json").read_text())
    assert report["passed"] and report["search"]["winner"] is not None
    assert (tmp_path / "demo-report.html").is_file()
