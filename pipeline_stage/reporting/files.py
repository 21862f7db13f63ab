"""The report's files: report.json (the typed report dumped), report.md and report.html."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline_stage.contract.report import Report


def render(report: Report, plots: list[tuple[str, str | None]] | None = None) -> dict[str, str]:
    """report.md and report.html by suffix, rendered once per run (the HTML's plots take a while;
    `plots` when already rendered, see `reporting.html.render_plots`); none for a run that ended
    before it had a candidate."""
    if report.candidate is None:
        return {}
    from pipeline_stage.reporting.html import to_html
    from pipeline_stage.reporting.markdown import to_markdown

    return {".md": to_markdown(report), ".html": to_html(report, plots)}


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str))
    tmp.replace(path)  # readers never see a half-written report
