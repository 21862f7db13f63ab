"""Built-in observer: progress lines on stderr (plain lines, so Kubeflow logs stay readable)."""

from __future__ import annotations

import sys

from pipeline_stage import hookimpl


def _say(context, message: str) -> None:
    if context.quiet:
        return
    print(f"[pipeline-stage] {message}", file=sys.stderr, flush=True)


@hookimpl
def before_step(step, index, context):
    _say(context, f"step {index + 1}/{len(context.steps)} {step.name} ({step.phase.value}) ...")


@hookimpl
def after_step(step, record, context):
    shown = ", ".join(f"{k}={v:.4g}" for k, v in record.metrics.items())
    _say(context, f"step {step.name} done in {record.seconds:.2f}s" + (f": {shown}" if shown else ""))


@hookimpl
def after_gates(results, passed, context):
    for r in results:
        _say(context, f"gate {r.label}: {r.tag_text()} -> {r.verdict.upper()}")


@hookimpl
def after_register(registered, context):
    alias = f" alias @{registered.alias}" if registered.alias else ""
    _say(context, f"registered {registered.uri}{alias}")
