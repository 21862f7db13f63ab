"""The short table `run` and `demo` print on stdout."""

from __future__ import annotations

from urllib.parse import quote

from rich.console import Console
from rich.table import Table

from pipeline_stage.contract.report import Report
from pipeline_stage.mlflow_io.tracking import redact
from pipeline_stage.reporting.markdown import fmt, rule_text


def ui_hint(report: Report, tracking_uri: str) -> str:
    reg = report.registered
    if tracking_uri.startswith(("http://", "https://")):
        base = redact(tracking_uri).rstrip("/")
        prefix = f"open {base}"
    else:
        base = "http://127.0.0.1:5000"
        prefix = f"mlflow ui --backend-store-uri {redact(tracking_uri)} --port 5000   # then open {base}"
    if reg:
        return f"{prefix}/#/models/{quote(reg.name)}/versions/{reg.version}"
    return f"{prefix}/#/experiments (run {report.run_id})"


def print_summary(report: Report, tracking_uri: str, console: Console | None = None) -> None:
    """The short table `run` and `demo` print: baseline vs optimized, gates, what was registered."""
    console = console or Console(soft_wrap=True)
    table = Table(title=f"pipeline-stage: {'PASSED' if report.passed else 'FAILED'}")
    table.add_column("metric")
    table.add_column("baseline", justify="right")
    table.add_column("optimized", justify="right")
    table.add_column("ratio", justify="right")
    compared = report.compared_baseline()
    for name, cand in (report.candidate or {}).items():
        base = compared.get(name)
        table.add_row(name, fmt(base), fmt(cand), fmt(cand / base) if base else "-")
    console.print(table)
    if report.gates:
        gates = Table(title="gates")
        for col in ("metric", "rule", "value", "verdict"):
            gates.add_column(col)
        for g in report.gates:
            gates.add_row(g.metric, rule_text(g), fmt(g.compared), g.verdict if g.passed else "FAIL")
        console.print(gates)
    reg = report.registered
    if reg:
        alias = f"  (alias @{reg.alias}: models:/{reg.name}@{reg.alias})" if reg.alias else "  (no alias)"
        console.print(f"registered: {reg.uri}{alias}")
    else:
        console.print("registered: nothing")
    console.print(f"MLflow UI:  {ui_hint(report, tracking_uri)}")
