"""report.html: one self-contained page (plots inlined as PNG data URIs) for people to read.

It holds what report.md holds (baseline vs candidate, gates, steps, search trials) plus plots made
with matplotlib: accuracy vs size and accuracy vs latency with the trials' Pareto front and the
winner marked, latency per variant, per-layer quantization error (from `analyze`), and fidelity
per output (SQNR against the baseline's outputs) for the float conversion, the candidate and each trial.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from pipeline_stage.contract.report import Report, per_layer_errors
from pipeline_stage.reporting.markdown import COMPILED_NOTE, compiled_table, fmt, rule_text

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1b1f24;padding:0 1rem}
h1 .verdict{padding:.1rem .6rem;border-radius:.3rem;color:#fff}
.pass{background:#1a7f37}.fail{background:#cf222e}
table{border-collapse:collapse;margin:.5rem 0 1.5rem;font-size:.9rem}
th,td{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.winner{background:#dafbe1}tr.closest{background:#fff8c5}
figure{display:inline-block;margin:0 1rem 1rem 0}figcaption{font-size:.85rem;color:#57606a}
code{background:#f6f8fa;padding:.1rem .3rem;border-radius:.2rem}
"""

# Marks the page once every plot has decoded, so a headless browser (and a person) can tell.
CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll('img.plot'));
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-plots-rendered', ok + '/' + imgs.length);
});
"""


def _axes(width: float, height: float):
    """A new figure and its axes, drawn off-screen (Agg: a pod has no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _points(report: Report) -> list[dict[str, Any]]:
    """Every measured variant: the float baseline, the search's trials (or the one candidate)."""
    points = []
    if report.baseline_tflite:
        points.append({"label": "float TFLite (baseline)", "kind": "baseline", "metrics": report.baseline_tflite})
    search = report.search
    if search:
        for t in search.trials:
            if t.metrics:
                kind = "winner" if t.index == search.winner else "closest" if t.index == search.closest else t.status
                points.append({"label": f"trial {t.index}: {t.origin}", "kind": kind, "metrics": t.metrics, "index": t.index})
    elif report.candidate:
        points.append({"label": "candidate", "kind": "winner" if report.passed else "failed", "metrics": report.candidate})
    return points


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (x lower-is-better, y higher-is-better)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def time_unit(values_ms: list[float]) -> tuple[float, str]:
    """The factor and unit to show latencies in: ms, or µs when every value is under a millisecond
    (sub-microsecond steps printed in ms run into each other: `0.00850.00875`)."""
    return (1000.0, "µs") if values_ms and max(values_ms) < 1.0 else (1.0, "ms")


def _tidy_ticks(axis) -> None:
    """At most six ticks, each printed with four significant digits and no offset."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    axis.set_major_locator(MaxNLocator(nbins=5))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.4g}"))


def _tradeoff_plot(points: list[dict[str, Any]], x_name: str, x_label: str) -> str | None:
    drawn = tradeoff_axes(points, x_name, x_label)
    return _png(drawn[0]) if drawn is not None else None


def tradeoff_axes(points: list[dict[str, Any]], x_name: str, x_label: str):
    """Accuracy against `x_name` for every variant, the trials' Pareto front dashed; (figure, axes),
    or None with fewer than two variants. A latency is shown in µs when all are under a millisecond."""
    usable = [p for p in points if "accuracy" in p["metrics"] and x_name in p["metrics"]]
    if len(usable) < 2:
        return None
    fig, ax = _axes(5.2, 3.8)
    scale = 1.0
    if x_name.startswith("latency"):
        scale, unit = time_unit([p["metrics"][x_name] for p in usable])
        x_label = x_label.replace("(ms", f"({unit}")
    colors = {
        "baseline": "#57606a",
        "winner": "#1a7f37",
        "passed": "#0969da",
        "failed": "#cf222e",
        "closest": "#bf8700",
        "error": "#8c959f",
    }
    xy = [(p["metrics"][x_name] * scale, p["metrics"]["accuracy"]) for p in usable]
    trials = [i for i, p in enumerate(usable) if p["kind"] != "baseline"]
    front = [trials[k] for k in pareto([xy[i] for i in trials])] if trials else []
    if len(front) > 1:
        ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], "--", color="#8c959f", lw=1, label="Pareto front (trials)")
    for i, p in enumerate(usable):
        marker = "*" if p["kind"] == "winner" else "s" if p["kind"] == "baseline" else "o"
        size = 220 if p["kind"] == "winner" else 60
        ax.scatter(
            [xy[i][0]],
            [xy[i][1]],
            s=size,
            marker=marker,
            color=colors.get(p["kind"], "#0969da"),
            zorder=3,
            label=p["label"] if p["kind"] in ("winner", "baseline", "closest") else None,
        )
        if "index" in p:
            ax.annotate(str(p["index"]), xy[i], textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(x_label)
    ax.set_ylabel("top-1 accuracy")
    _tidy_ticks(ax.xaxis)
    _tidy_ticks(ax.yaxis)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return fig, ax


def _latency_plot(points: list[dict[str, Any]]) -> str | None:
    usable = [p for p in points if "latency_p50_ms" in p["metrics"]]
    if not usable:
        return None
    fig, ax = _axes(5.2, 0.45 * len(usable) + 1.2)
    labels = [p["label"][:48] for p in usable]
    scale, unit = time_unit([p["metrics"]["latency_p50_ms"] for p in usable])
    values = [p["metrics"]["latency_p50_ms"] * scale for p in usable]
    colors = ["#1a7f37" if p["kind"] == "winner" else "#57606a" if p["kind"] == "baseline" else "#0969da" for p in usable]
    ax.barh(range(len(values)), values, color=colors)
    ax.set_yticks(range(len(values)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"latency p50 ({unit}, batch 1, 1 thread, XNNPACK)")
    _tidy_ticks(ax.xaxis)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _fidelity_plot(report: Report) -> str | None:
    """SQNR against the baseline per output: the float conversion, the candidate, each search trial."""
    candidate = report.candidate or {}
    outputs = sorted(k.split(".", 1)[1] for k in candidate if k.startswith("fidelity_sqnr_db."))
    keys = [f"fidelity_sqnr_db.{o}" for o in outputs] or (["fidelity_sqnr_db"] if "fidelity_sqnr_db" in candidate else [])
    if not keys:
        return None
    series = [("float TFLite (baseline)", report.baseline_tflite), ("candidate", candidate)]
    if report.search:
        series += [(f"trial {t.index}", t.metrics) for t in report.search.trials if t.metrics]
    fig, ax = _axes(6.5, 3.6)
    width = 0.8 / len(series)
    for k, (label, metrics) in enumerate(series):
        values = [metrics.get(key, float("nan")) for key in keys]
        ax.bar([i + k * width for i in range(len(keys))], values, width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], outputs or ["model"])
    ax.set_ylabel("SQNR vs baseline (dB) — higher is closer")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def _layer_error_plot(rows: list[dict[str, Any]] | None) -> str | None:
    if not rows:
        return None
    rows = rows[:20]
    fig, ax = _axes(6.5, 0.32 * len(rows) + 1.2)
    labels = [f"{r['op']} {r['tensor'].split(';')[0][-40:]}" for r in rows]
    ax.barh(range(len(rows)), [r["rmse/scale"] for r in rows], color="#bf8700")
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("quantization error (RMSE / int8 step) — higher hurts more")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _table(headers: list[str], rows: list[list[Any]], classes: list[str] | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>"]
    for k, row in enumerate(rows):
        cls = f' class="{classes[k]}"' if classes and classes[k] else ""
        cells = "".join(
            f'<td class="num">{html.escape(fmt(c))}</td>'
            if isinstance(c, (int, float)) and not isinstance(c, bool)
            else f"<td>{html.escape(str(c))}</td>"
            for c in row
        )
        out.append(f"<tr{cls}>{cells}</tr>")
    return "".join(out) + "</table>"


def render_plots(report: Report) -> list[tuple[str, str | None]]:
    """The page's plots as (title, PNG data URI or None when it has nothing to show). They depend
    on the measurements only, not on the registration, so the stage renders them meanwhile."""
    search = report.search
    points = _points(report)
    return [
        ("accuracy vs size", _tradeoff_plot(points, "size_bytes", "size (bytes)")),
        ("accuracy vs latency", _tradeoff_plot(points, "latency_p50_ms", "latency p50 (ms)")),
        ("latency per variant", _latency_plot(points)),
        (
            "per-layer quantization error: the chain as written (search trial 1)",
            _layer_error_plot(search.as_written_per_layer if search else None),
        ),
        ("per-layer quantization error: the candidate (analyze)", _layer_error_plot(per_layer_errors(report.steps))),
        ("fidelity per output (SQNR against the baseline's outputs)", _fidelity_plot(report)),
    ]


def to_html(report: Report, plots: list[tuple[str, str | None]] | None = None) -> str:
    """The whole report as one HTML page with nothing external to fetch; `plots`: from
    :func:`render_plots`, when already rendered."""
    passed = report.passed
    e = html.escape
    parts = [
        f"<h1>pipeline-stage report <span class='verdict {'pass' if passed else 'fail'}'>{'PASSED' if passed else 'FAILED'}</span></h1>",
        "<ul>",
        f"<li>manifest: <code>{e(str(report.manifest.path))}</code> (chain digest <code>{e(report.manifest.chain_digest)}</code>)</li>",
        f"<li>source model: <code>{e(str(report.source.uri))}</code></li>",
    ]
    reg = report.registered
    parts.append(
        f"<li>registered: <code>{e(reg.uri)}</code>"
        + (f" with alias <code>@{e(reg.alias)}</code>" if reg.alias else " (no alias)")
        + "</li>"
        if reg
        else "<li>registered: nothing</li>"
    )
    parts.append(f"<li>MLflow run: <code>{e(str(report.run_id))}</code></li></ul>")

    compared = report.compared_baseline()
    rows = [
        [name, compared.get(name), value, (value / compared[name]) if compared.get(name) else "-"]
        for name, value in (report.candidate or {}).items()
    ]
    parts += ["<h2>Baseline vs candidate</h2>", _table(["metric", "baseline", "candidate", "ratio"], rows)]
    if report.gates:
        parts += [
            "<h2>Gates</h2>",
            _table(
                ["metric", "rule", "value", "compared", "verdict"],
                [
                    [
                        g.metric,
                        rule_text(g),
                        g.value,
                        g.compared if g.compared is not None else "-",
                        g.verdict if g.passed else "FAIL",
                    ]
                    for g in report.gates
                ],
                ["" if g.passed else "closest" for g in report.gates],
            ),
        ]

    if report.compiled:
        headers, rows = compiled_table(report)
        parts += ["<h2>Compiled for accelerators</h2>", _table(headers, rows), f"<p>{e(COMPILED_NOTE)}</p>"]

    search = report.search
    if search:
        parts += [
            "<h2>Search</h2>",
            f"<p>{e(search.why)}. Strategy <code>{e(search.strategy)}</code>, objective "
            f"<code>{e(', '.join(search.objective))}</code>, {len(search.trials)} trials in {search.seconds:.1f} s "
            f"({search.parallel} at a time), stopped: {e(search.stopped_because)}.</p>",
        ]
        names = sorted({k for t in search.trials for k in t.metrics})
        rows, classes = [], []
        for t in search.trials:
            rows.append(
                [
                    t.index,
                    t.origin,
                    t.chain,
                    t.status if not t.error else f"error: {t.error}",
                    *[t.metrics.get(n, "-") for n in names],
                    ", ".join(t.failed_gates) or "-",
                    t.seconds,
                ]
            )
            classes.append("winner" if t.index == search.winner else "closest" if t.index == search.closest else "")
        parts.append(_table(["#", "why tried", "chain", "verdict", *names, "failed gates", "seconds"], rows, classes))
        if search.not_tried:
            parts.append("<p>Not tried:</p>")
            rows = [[n["move"], n["origin"] or "-", n["reason"]] for n in search.not_tried]
            parts.append(_table(["move", "proposal", "why not"], rows, [""] * len(rows)))

    shown = [(title, uri) for title, uri in (plots if plots is not None else render_plots(report)) if uri]
    if shown:
        parts.append("<h2>Plots</h2>")
        parts += [
            f"<figure><img class='plot' alt='{e(title)}' src='{uri}'><figcaption>{e(title)}</figcaption></figure>"
            for title, uri in shown
        ]

    if report.steps:
        rows = [
            [
                i + 1,
                s.name,
                s.phase,
                ", ".join(f"{k}={v}" for k, v in s.params.items()) or "-",
                ", ".join(f"{k}={fmt(v)}" for k, v in s.metrics.items()) or "-",
                s.seconds,
            ]
            for i, s in enumerate(report.steps)
        ]
        parts += ["<h2>Steps</h2>", _table(["#", "step", "phase", "params", "metrics after", "seconds"], rows)]
    if report.timed:
        rows = [
            [t.metric, t.baseline, t.candidate, t.ratio, f"±{fmt(t.spread)}", f"{t.rounds} x {t.runs_per_round}"]
            for t in report.timed
        ]
        parts += ["<h2>Timed side by side</h2>", _table(["metric", "baseline", "candidate", "ratio", "spread", "rounds"], rows)]
    if report.timing is not None and report.timing.rows():
        rows = [[name, round(seconds, 2)] for name, seconds in report.timing.rows()]
        parts += ["<h2>Where the time went</h2>", _table(["phase", "seconds"], rows)]
    conv = report.conversion
    if conv:
        parts += [
            "<h2>Conversion</h2>",
            _table(
                ["", "ops"],
                [
                    ["float baseline", ", ".join(f"{k}×{v}" for k, v in report.baseline_flatbuffer.get("ops", {}).items())],
                    ["optimized", ", ".join(f"{k}×{v}" for k, v in conv.flatbuffer["ops"].items())],
                ],
            ),
        ]
    body = "\n".join(parts)
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>pipeline-stage report</title>"
        f"<style>{CSS}</style><script>{CHECK_SCRIPT}</script></head><body>{body}</body></html>\n"
    )
