"""What every class a plugin registers (a step, a metric, a search move) shares."""

from __future__ import annotations


class PluginClass:
    """The base of steps, metrics and search moves: the one-line summary `pipeline-stage plugins` shows."""

    @classmethod
    def summary(cls) -> str:
        """The first line of the class's docstring, or ""."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""
