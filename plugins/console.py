"""Built-in observer: progress lines for steps, gates and registration, on the stage's one stderr
channel (``context.log``: plain lines, so Kubeflow logs stay readable)."""

from __future__ import annotations

from pipeline_stage import hookimpl


@hookimpl
def before_step(step, index, context):
    context.log("step", f"{index + 1}/{len(context.steps)} {step.name} ({step.phase.value}) ...")


@hookimpl
def after_step(step, record, context):
    shown = ", ".join(f"{k}={v:.4g}" for k, v in record.metrics.items())
    context.log("step", f"{step.name} done in {record.seconds:.2f}s" + (f": {shown}" if shown else ""))


@hookimpl
def after_gates(results, passed, context):
    for r in results:
        context.log("gate", f"{r.label}: {r.tag_text()} -> {r.verdict.upper()}")


@hookimpl
def after_register(registered, context):
    alias = f" alias @{registered.alias}" if registered.alias else ""
    context.log("register", f"{registered.uri}{alias}")
