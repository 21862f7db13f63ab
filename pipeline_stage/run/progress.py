"""Progress lines of long work (epochs, calibration, evaluation, trials) on stderr."""

from __future__ import annotations

import sys
from typing import Callable


class Progress:
    """`progress(label)` gives a `log(message)` for one kind of work: one plain line per event, which
    is what Kubeflow's pod logs want; on a terminal the same lines with the label and verdicts
    coloured. Quiet: nothing."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._console = None
        if sys.stderr.isatty() and not quiet:
            from rich.console import Console

            self._console = Console(stderr=True, highlight=False, soft_wrap=True)

    def __call__(self, label: str) -> Callable[[str], None]:
        def log(message: str) -> None:
            if self.quiet:
                return
            if self._console is not None:
                from rich.markup import escape

                text = escape(message)
                for word, colour in (("PASSED", "green"), ("FAILED", "red"), ("ERROR", "red")):
                    text = text.replace(word, f"[bold {colour}]{word}[/]")
                self._console.print(f"[cyan]\\[{escape(label)}][/] {text}")
            else:
                print(f"[{label}] {message}", file=sys.stderr, flush=True)

        return log
