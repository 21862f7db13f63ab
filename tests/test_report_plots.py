"""The HTML report's plots read well whatever the numbers: latencies of a few microseconds are
shown in µs with a handful of short tick labels (they ran into each other in ms: `0.00850.00875`)."""

from __future__ import annotations

import matplotlib.pyplot as plt

from pipeline_stage.reporting.html import time_unit, tradeoff_axes


def _points(latencies_ms):
    return [
        {
            "label": f"trial {i}",
            "kind": "baseline" if i == 0 else "passed",
            "index": i,
            "metrics": {"accuracy": 0.95 + 0.001 * i, "latency_p50_ms": v},
        }
        for i, v in enumerate(latencies_ms)
    ]


def test_microsecond_latencies_are_plotted_in_microseconds_with_short_ticks():
    fig, ax = tradeoff_axes(_points([0.0085, 0.00862, 0.00875, 0.00881, 0.0090]), "latency_p50_ms", "latency p50 (ms)")
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    plt.close(fig)
    assert "µs" in ax.get_xlabel() and "ms" not in ax.get_xlabel()
    assert 2 <= len(labels) <= 7, labels
    assert all(len(label) <= 5 for label in labels), labels  # "8.6", "8.75": no run-in digits
    assert all(8.0 <= float(label.replace("−", "-")) <= 9.5 for label in labels), labels


def test_millisecond_latencies_stay_in_milliseconds():
    assert time_unit([0.4, 2.5]) == (1.0, "ms")
    assert time_unit([0.4, 0.9]) == (1000.0, "µs")
    assert time_unit([]) == (1.0, "ms")
