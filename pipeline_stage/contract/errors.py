"""The stage's errors: one small hierarchy, turned into CLI messages and exit codes in `cli.py`.

Exit codes (documented in the README, "Exit codes"): a retry policy retries 1 only.
    0  success
    1  a retry may succeed: the tracking server or an object store unreachable, timing out, 5xx
    2  bad input, and every other answer a retry would repeat: manifest, URIs, params, data,
       plugin wiring, a model no chain or recipe can take (a search where no trial made a model)
    3  a gate failed: nothing was promoted (not an error: the stage returns a report whose
       ``passed`` is false, and the CLI maps it to this code)
    4  a plugin or the stage itself failed unexpectedly (a bug): a retry repeats it; report it
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


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
    """A plugin's step, engine, metric or loader raised unexpectedly; names it and its distribution."""

    exit_code = 4


class IntegrityError(InputError):
    """Stored model files do not match the sha256 recorded when the stage registered them; names
    each file and both digests (`pipeline-stage verify`, alias moves, reuse)."""


class TrackingError(StageError):
    """The MLflow tracking server could not be reached or kept failing."""


GATE_FAILED_EXIT = 3
UNEXPECTED_EXIT = 4  # what PluginError and an exception no one classified exit with


@contextmanager
def plugin_failures(what: str, *passing: type[BaseException]) -> Iterator[None]:
    """Around a plugin's code: a StageError (and the `passing` types, which the caller handles)
    goes through as raised; any other exception becomes a PluginError saying that `what` failed,
    with its type and message, the exception as its cause."""
    try:
        yield
    except (StageError, *passing):
        raise
    except Exception as exc:
        raise PluginError(f"{what} failed: {type(exc).__name__}: {exc}") from exc


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
