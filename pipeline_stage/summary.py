"""The short table `run` and `demo` print on stdout."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from rich.console import Console
from rich.table import Table

from pipeline_stage.report import _fmt, rule_text
from pipeline_stage.tracking import redact


def ui_hint(report: dict[str, Any], tracking_uri: str) -> str:
    reg = report.get("registered")
    if tracking_uri.startswith(("http://", "https://")):
        base = redact(tracking_uri).rstrip("/")
        prefix = f"open {base}"
    else:
        base = "http://127.0.0.1:5000"
        prefix = f"mlflow ui --backend-store-uri {redact(tracking_uri)} --port 5000   # then open {base}"
    if reg:
        return f"{prefix}/#/models/{quote(reg['name'])}/versions/{reg['version']}"
    return f"{prefix}/#/experiments (run {report.get('run_id')})"


def print_summary(report: dict[str, Any], tracking_uri: str, console: Console | None = None) -> None:
    console = console or Console(soft_wrap=True)
    table = Table(title=f"pipeline-stage: {'PASSED' if report.get('passed') else 'FAILED'}")
    table.add_column("metric")
    table.add_column("baseline", justify="right")
    table.add_column("optimized", justify="right")
    table.add_column("ratio", justify="right")
    for name, cand in report.get("candidate", {}).items():
        base = report.get("baseline", {}).get(name)
        table.add_row(name, _fmt(base), _fmt(cand), _fmt(cand / base) if base else "-")
    console.print(table)
    if report.get("gates"):
        gates = Table(title="gates")
        for col in ("metric", "rule", "value", "verdict"):
            gates.add_column(col)
        for g in report["gates"]:
            gates.add_row(g["metric"], rule_text(g), _fmt(g["compared"]), "pass" if g["passed"] else "FAIL")
        console.print(gates)
    reg = report.get("registered")
    if reg:
        alias = f"  (alias @{reg['alias']}: models:/{reg['name']}@{reg['alias']})" if reg.get("alias") else "  (no alias)"
        console.print(f"registered: {reg['uri']}{alias}")
    else:
        console.print("registered: nothing")
    console.print(f"MLflow UI:  {ui_hint(report, tracking_uri)}")
