"""report.md: the typed report as Markdown for people (logged to the MLflow run and written next to --report)."""

from __future__ import annotations

from typing import Any

from pipeline_stage.contract.report import GateResult, Report


def fmt(value: Any) -> str:
    """A number as people read it in a report: 4 significant digits, thousands separated."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value.is_integer() and abs(value) >= 1000:
            return f"{int(value):,}"
        return f"{value:.4g}"
    return str(value)


def rule_text(g: GateResult) -> str:
    return f"{g.rule} {fmt(g.threshold)}"


def _conversion_fidelity(report: Report) -> list[str]:
    """The float conversion measured against the source model's own outputs, beside the candidate:
    what converting alone cost (a framework source; a .tflite source is its own float model)."""
    if not report.baseline_tflite or report.source.kind in (None, "tflite"):
        return []
    lines = [
        "",
        "## Float .tflite vs the source",
        "",
        f"The source model ({report.source.kind}) is the baseline: its own outputs are the reference. The float "
        "conversion is measured against them too, so what conversion alone costs shows apart from quantization.",
        "",
        "| metric | source model | float .tflite | candidate |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, converted in report.baseline_tflite.items():
        candidate = (report.candidate or {}).get(name)
        lines.append(f"| {name} | {fmt(report.baseline.get(name))} | {fmt(converted)} | {fmt(candidate)} |")
    return lines


COMPILED_NOTE = (
    "Ops left on the CPU are those the vendor's compiler did not take; a compiled model not evaluated "
    "here has not passed anything: only the device can run it."
)


def compiled_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """Per accelerator target: what its compiler took, the file, and how it measured here (or why
    not): the headers and rows report.md and report.html both show."""
    headers = [
        "target",
        "status",
        "ops offloaded",
        "partitions",
        "left on the CPU",
        "bytes",
        "stamp / SDK",
        "measured here",
        "gates",
    ]
    rows = []
    for c in report.compiled:
        if c.status != "compiled":
            what = "rejected by the compiler" if c.status == "rejected" else "failed"
            rows.append([c.target, f"{what}: {c.error}", *["-"] * 7])
            continue
        part = c.partition
        on_cpu = ", ".join(f"{op} x{n}" for op, n in part.get("on_cpu", {}).items()) or "none"
        measured = (
            ", ".join(f"{k} {fmt(v)}" for k, v in c.metrics.items()) if c.evaluated else f"not evaluated here ({c.not_evaluated})"
        )
        failed = [g.failure_text() for g in c.gates if not g.passed]
        gates = "-" if not c.evaluated or not c.gates else ("FAIL: " + "; ".join(failed) if failed else "passed")
        rows.append(
            [
                c.target,
                "compiled",
                f"{part['offloaded']}/{part['ops']} ({part['share']:.0%})",
                str(part["partitions"]),
                on_cpu,
                f"{c.size_bytes:,}",
                f"{'/'.join(c.stamp.values()) or 'no stamp'} / {c.sdk}",
                measured,
                gates,
            ]
        )
    return headers, rows


def _compiled(report: Report) -> list[str]:
    if not report.compiled:
        return []
    headers, rows = compiled_table(report)
    lines = ["", "## Compiled for accelerators", "", "| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + ["", COMPILED_NOTE]


def to_markdown(report: Report) -> str:
    lines = [f"# pipeline-stage report: {'PASSED' if report.passed else 'FAILED'}", ""]
    lines += [
        f"- manifest: `{report.manifest.path}` (chain digest `{report.manifest.chain_digest}`)",
        f"- source model: `{report.source.uri}`",
    ]
    r = report.registered
    if r:
        lines.append(f"- registered: `{r.uri}`" + (f" with alias `@{r.alias}`" if r.alias else " (no alias)"))
    else:
        lines.append("- registered: nothing")
    lines += ["", "## Baseline vs candidate", "", "| metric | baseline | candidate | ratio |", "| --- | ---: | ---: | ---: |"]
    compared = report.compared_baseline()
    for name, cand in (report.candidate or {}).items():
        base = compared.get(name)
        ratio = fmt(cand / base) if base else "-"
        lines.append(f"| {name} | {fmt(base)} | {fmt(cand)} | {ratio} |")
    lines += _conversion_fidelity(report)
    if report.gates:
        lines += ["", "## Gates", "", "| metric | rule | value | compared | verdict |", "| --- | --- | ---: | ---: | --- |"]
        for g in report.gates:
            lines.append(
                f"| {g.metric} | {rule_text(g)} | {fmt(g.value)} | {fmt(g.compared)} | {g.verdict if g.passed else '**FAIL**'} |"
            )
    lines += _compiled(report)
    search = report.search
    if search:
        names = sorted({k for t in search.trials for k in t.metrics})
        lines += [
            "",
            "## Search",
            "",
            f"{search.why}.",
            "",
            f"Strategy `{search.strategy}`, objective `{', '.join(search.objective)}`, {len(search.trials)} trials "
            f"in {search.seconds:.1f} s ({search.parallel} at a time), stopped: {search.stopped_because}.",
            "",
            "| # | why tried | chain | verdict | " + " | ".join(names) + " | failed gates |",
            "| ---: | --- | --- | --- | " + " | ".join("---:" for _ in names) + " | --- |",
        ]
        for t in search.trials:
            mark = " **(winner)**" if t.index == search.winner else " (closest)" if t.index == search.closest else ""
            verdict = t.status + mark if not t.error else f"error: {t.error}"
            lines.append(
                f"| {t.index} | {t.origin} | `{t.chain}` | {verdict} | "
                + " | ".join(fmt(t.metrics.get(n)) for n in names)
                + f" | {', '.join(t.failed_gates) or '-'} |"
            )
        if search.not_tried:
            lines += ["", "Not tried:", "", "| move | proposal | why not |", "| --- | --- | --- |"]
            lines += [f"| {n['move']} | {n['origin'] or '-'} | {n['reason']} |" for n in search.not_tried]
    if report.source_notes:
        lines += ["", "## Source notes", ""] + [f"- {n}" for n in report.source_notes]
    if report.evaluation_notes:
        lines += ["", "## Evaluation notes", ""] + [f"- {n}" for n in report.evaluation_notes]
    lines += [
        "",
        "## Steps",
        "",
        "| # | step | phase | params | metrics after | seconds |",
        "| ---: | --- | --- | --- | --- | ---: |",
    ]
    for i, s in enumerate(report.steps):
        params = ", ".join(f"{k}={v}" for k, v in s.params.items()) or "-"
        metrics = ", ".join(f"{k}={fmt(v)}" for k, v in s.metrics.items()) or "-"
        lines.append(f"| {i + 1} | {s.name} | {s.phase} | {params} | {metrics} | {s.seconds:.2f} |")
    if report.timed:
        lines += [
            "",
            "## Timed side by side",
            "",
            "| metric | baseline | candidate | ratio | spread | rounds |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {t.metric} | {fmt(t.baseline)} | {fmt(t.candidate)} | {fmt(t.ratio)} | ±{fmt(t.spread)} | {t.rounds} x {t.runs_per_round} |"
            for t in report.timed
        ]
    if report.timing is not None and report.timing.rows():
        lines += ["", "## Where the time went", "", "| phase | seconds |", "| --- | ---: |"]
        lines += [f"| {name} | {seconds:.2f} |" for name, seconds in report.timing.rows()]
    conv = report.conversion
    if conv:
        before = report.baseline_flatbuffer.get("ops", {})
        lines += [
            "",
            "## Conversion",
            "",
            f"- settings: `{conv.settings}`",
            f"- seconds: {conv.seconds:.2f}",
            f"- ops (float baseline): {', '.join(f'{k}×{v}' for k, v in before.items())}",
            f"- ops (optimized): {', '.join(f'{k}×{v}' for k, v in conv.flatbuffer['ops'].items())}",
            f"- weight tensor types: {conv.flatbuffer['weight_dtypes']}",
            f"- activation tensor types: {conv.flatbuffer['activation_dtypes']}",
        ]
    return "\n".join(lines) + "\n"
