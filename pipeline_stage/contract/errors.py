"""The stage's errors: one small hierarchy, turned into CLI messages and exit codes in `cli.py`.

Exit codes (documented in the README, "Exit codes"):
    0  success
    1  anything else (tracking server unreachable, a plugin crashed, an unexpected failure)
    2  bad input: manifest, URIs, params, data, plugin wiring
    3  a gate failed: nothing was promoted (not an error: the stage returns a report whose
       ``passed`` is false, and the CLI maps it to this code)
"""

from __future__ import annotations

from collections.abc import Iterator


class StageError(Exception):
    """Base class: a failure the stage can explain in one message."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"


class InputError(StageError):
    """Bad input that is the caller's to fix: a URI, a data file, a model that does not fit."""

    exit_code = 2


class ManifestError(InputError):
    """The manifest is wrong; the message names the file, the line and the field."""

    def __init__(
        self, message: str, *, path: str | None = None, line: int | None = None, field: str | None = None, hint: str | None = None
    ):
        where = path or "<manifest>"
        if line is not None:
            where = f"{where}:{line}"
        prefix = f"{where}: " + (f"`{field}`: " if field else "")
        super().__init__(prefix + message, hint=hint)
        self.path, self.line, self.field = path, line, field


class PluginLoadError(InputError):
    """A plugin could not be loaded or registered something invalid; names the distribution."""


class PluginError(StageError):
    """A plugin's step, metric or loader raised while running; names the step and distribution."""


class IntegrityError(InputError):
    """Stored model files do not match the sha256 recorded when the stage registered them; names
    each file and both digests (`pipeline-stage verify`, alias moves, reuse)."""


class TrackingError(StageError):
    """The MLflow tracking server could not be reached or kept failing."""


GATE_FAILED_EXIT = 3


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), cut to 300
    characters: what a one-line error quotes of its cause."""
    text = getattr(exc, "message", None) or str(exc)
    return (text.strip().splitlines() or [type(exc).__name__])[0][:300]


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what caused it (``raise ... from``, or the exception being handled), once each."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__
