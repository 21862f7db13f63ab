"""What MLflow raises, turned into the stage's errors by cause, in one place; and the bound on the
time a run spends failing once the tracking server has gone.

By cause, not by where it happens (model resolution, downloads, logging, registration, alias moves):

* an object store's error (S3, GCS, Azure Blob, when the stage talks to the store itself) ->
  :func:`mlflow_io.object_store.store_error`: no client installed, access refused or no such
  bucket is exit 2, a store that does not answer exit 1;
* the server cannot be reached, times out or answers 5xx -> :class:`TrackingError` (exit 1): a
  transient failure that a Kubeflow retry may fix; the message names the server and what the stage
  was doing;
* the server answers that a run, artifact, model, version or alias does not exist, or that a value
  is invalid -> :class:`InputError` (exit 2): the manifest or its URIs need fixing;
* the server refuses the credentials -> :class:`InputError` (exit 2), naming the variables to set;
  a user without the permission (PERMISSION_DENIED) -> exit 2 naming the user and what was refused;
* the server rejects a write because another client made the same write at the same moment (a
  constraint violation, ``RESOURCE_ALREADY_EXISTS``, a locked database: a concurrent stage) ->
  never bad input: :func:`concurrent_write` treats an idempotent write as done and retries any
  other; one still rejected after the retries is a :class:`TrackingError` (exit 1);
* anything else MLflow raises -> :class:`TrackingError` (exit 1).

The bound (``PIPELINE_STAGE_OUTAGE_BOUND_S``, default 60 s, see :func:`outage_bound`) is spent
as: MLflow's own retries of the request that finds the server gone (2 retries with backoff, about
3 s for a refused connection), then the stage's cleanup (ending the run FAILED, deleting a version
it had created, putting an alias back), retried while the server may come back, for at most half
the bound from the first cleanup call (:class:`CleanupClock`).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import NoReturn, TypeVar

from pipeline_stage.contract.errors import InputError, StageError, TrackingError, causes
from pipeline_stage.mlflow_io.object_store import is_client_module, store_error
from pipeline_stage.mlflow_io.tracking import first_line, redact

T = TypeVar("T")

MISSING = {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE", "ENDPOINT_NOT_FOUND", "BAD_REQUEST"}
DENIED = {"PERMISSION_DENIED", "UNAUTHENTICATED"}
DEFAULT_OUTAGE_BOUND_S = 60.0
# What the stores behind `mlflow server` answer when two clients write the same row at once:
# sqlite, PostgreSQL, MySQL (IntegrityError / unique violations, deadlocks, lock waits), and
# MLflow's own RESOURCE_ALREADY_EXISTS.
CONFLICT_MARKS = (
    "UNIQUE constraint failed",
    "duplicate key value violates unique constraint",
    "IntegrityError",
    "UniqueViolation",
    "Duplicate entry",
    "database is locked",
    "deadlock detected",
    "Deadlock found",
    "could not serialize access",
    "Lock wait timeout",
)


def seconds_from_env(name: str, default: float, floor: float) -> float:
    """A number of seconds from environment variable `name` (`default` when unset), at least
    `floor`; anything else is exit 2 naming the variable."""
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise InputError(f"{name} is `{raw}`, not a number of seconds", hint=f"set it to e.g. {default:g}, or unset it") from None
    return max(value, floor)


def outage_bound() -> float:
    """Seconds from the request that finds the tracking server gone to the stage's exit (env
    ``PIPELINE_STAGE_OUTAGE_BOUND_S``, default 60)."""
    return seconds_from_env("PIPELINE_STAGE_OUTAGE_BOUND_S", DEFAULT_OUTAGE_BOUND_S, 5.0)


def _http_status(exc: BaseException) -> int | None:
    for e in causes(exc):
        response = getattr(e, "response", None)
        status = getattr(response, "status_code", None) or getattr(response, "status", None)
        if isinstance(status, int):
            return status
        getter = getattr(e, "get_http_status_code", None)
        if callable(getter):
            try:
                status = int(getter())
            except (TypeError, ValueError):
                status = None
            if status and status != 500:  # MLflow's default for an exception without a status
                return status
    return None


def is_outage(exc: BaseException) -> bool:
    """A connection error, a timeout or a 5xx answer anywhere in the exception's chain."""
    for e in causes(exc):
        module = type(e).__module__
        if isinstance(e, ConnectionError | TimeoutError):
            return True
        if module.startswith(("requests", "urllib3")) and any(
            word in type(e).__name__ for word in ("Connection", "Timeout", "MaxRetry", "Protocol", "ResponseError")
        ):
            return True
        if module.startswith("mlflow") and getattr(e, "error_code", "") in ("TEMPORARILY_UNAVAILABLE",):
            return True
    status = _http_status(exc)
    return status is not None and status >= 500


def _server() -> str:
    try:
        import mlflow

        return redact(mlflow.get_tracking_uri())
    except Exception:  # pragma: no cover - mlflow always importable where this runs
        return "(unknown)"


def server_answers(timeout: float = 5.0) -> bool:
    """Whether the tracking server answers its health check now (always true for a local store)."""
    try:
        import mlflow
        import requests

        uri = mlflow.get_tracking_uri()
        if not uri.startswith(("http://", "https://")):
            return True
        return requests.get(uri.rstrip("/") + "/health", timeout=timeout).status_code < 500
    except Exception:
        return False


def classify(exc: BaseException, doing: str, *, missing: str | None = None, missing_hint: str | None = None) -> StageError:
    """The stage's error for `exc`, raised by MLflow while the stage was `doing` something
    ("downloading `data.evaluation` (runs:/...)", say); `missing` says what a 404 means for the
    caller ("model `X` does not exist in the tracking server")."""
    if isinstance(exc, StageError):
        return exc
    from_store = store_error(exc, doing)
    if from_store is not None:
        return from_store
    if is_outage(exc):
        return TrackingError(
            f"the MLflow tracking server {_server()} failed while {doing}: {first_line(exc)}",
            hint="the server is unreachable or failing (nothing was registered and no alias moved); "
            "retry the step once it answers",
        )
    if is_conflict(exc):
        return TrackingError(
            f"the MLflow tracking server {_server()} kept rejecting a write as made concurrently by another client "
            f"while {doing}: {first_line(exc)}",
            hint="another stage wrote the same record at the same moment; retry the step",
        )
    if _code(exc) == "PERMISSION_DENIED" or _http_status(exc) == 403:
        user = os.environ.get("MLFLOW_TRACKING_USERNAME") or "(the token's identity)"
        return InputError(
            f"MLflow user `{user}` lacks a permission on {_server()} (refused while {doing}): {first_line(exc)}",
            hint="ask an owner (MANAGE) of that experiment or registered model to grant the permission (EDIT to write), "
            "or use a name you own; if that is not the user meant, set MLFLOW_TRACKING_USERNAME / PASSWORD or MLFLOW_TRACKING_TOKEN",
        )
    if _denied(exc):
        return InputError(
            f"the MLflow tracking server {_server()} refused the credentials while {doing}: {first_line(exc)}",
            hint="set MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD",
        )
    if is_missing(exc):
        if not server_answers():  # MLflow reports some outages as a missing path (runs:/ downloads)
            return TrackingError(
                f"the MLflow tracking server {_server()} does not answer (while {doing}: {first_line(exc)})",
                hint="retry the step once the server answers",
            )
        return InputError(f"{missing or doing}: {first_line(exc)}", hint=missing_hint)
    return TrackingError(f"the MLflow tracking server {_server()} failed while {doing}: {first_line(exc)}")


def from_tracking(exc: BaseException) -> bool:
    """Whether `exc` comes from talking to the server or an object store (MLflow, requests,
    urllib3, a connection, a store's client or its absence)."""
    return any(
        type(e).__module__.startswith(("mlflow", "requests", "urllib3"))
        or is_client_module(type(e).__module__)
        or isinstance(e, ConnectionError | TimeoutError)
        or (isinstance(e, ModuleNotFoundError) and is_client_module(e.name or ""))
        for e in causes(exc)
    )


def raise_classified(exc: BaseException, doing: str, *, missing: str | None = None, missing_hint: str | None = None) -> NoReturn:
    """Raise :func:`classify`'s error for `exc` (chained to it); an exception that does not come
    from talking to the server (a bug, a plugin's error) is raised unchanged."""
    if not isinstance(exc, StageError) and not from_tracking(exc):
        raise exc
    error = classify(exc, doing, missing=missing, missing_hint=missing_hint)
    if error is exc:
        raise exc
    raise error from exc


def _code(exc: BaseException) -> str:
    return next((getattr(e, "error_code", "") for e in causes(exc) if getattr(e, "error_code", "")), "")


def is_missing(exc: BaseException) -> bool:
    """The server answered that the thing asked for does not exist (a 404, RESOURCE_DOES_NOT_EXIST)."""
    return not is_outage(exc) and not is_conflict(exc) and (_code(exc) in MISSING or _http_status(exc) == 404)


def is_conflict(exc: BaseException) -> bool:
    """The server rejected a write because another client made the same write first, or holds the
    row now (RESOURCE_ALREADY_EXISTS, a unique-constraint violation, a lock): a concurrent stage,
    never bad input. MLflow relays the store's error text in a BAD_REQUEST or
    INVALID_PARAMETER_VALUE answer, so the text is what tells it apart."""
    if _code(exc) == "RESOURCE_ALREADY_EXISTS":
        return True
    return any(mark in str(e) for e in causes(exc) for mark in CONFLICT_MARKS)


def concurrent_write(fn: Callable[[], T], *, idempotent: bool, attempts: int = 6) -> T | None:
    """Call `fn`, one write to the tracking server, that a concurrent stage may make at the same
    moment. When the server answers that another client made it first (:func:`is_conflict`), an
    idempotent write (a tag whose value any writer may set, a terminal status, a model that must
    exist) is done, and returns None; any other is retried with jittered backoff (a rejected write
    wrote nothing), up to `attempts` times. Every other error is raised at once."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if not is_conflict(exc):
                raise
            if idempotent:
                return None
            if attempt + 1 >= attempts:
                raise
            time.sleep(random.uniform(0.05, 0.25) * 2**attempt)
    return None  # pragma: no cover - the loop returns or raises


def _denied(exc: BaseException) -> bool:
    return _code(exc) in DENIED or _http_status(exc) in (401, 403)


def retrying(fn: Callable[[], T], *, attempts: int = 3, delay: float = 0.5, until: float | None = None) -> T:
    """Call `fn` until it succeeds: `attempts` times with exponential backoff, or, with `until`
    (a time.monotonic() deadline), as long as the deadline allows; re-raise the last error.
    Errors that retrying cannot fix (a missing resource, bad credentials) are raised at once."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            attempt += 1
            if is_missing(exc) or _denied(exc):
                raise
            pause = min(delay * 2 ** (attempt - 1), 4.0)
            out_of_time = until is not None and time.monotonic() + pause >= until
            if (until is None and attempt >= attempts) or out_of_time:
                raise
            time.sleep(pause)


class CleanupClock:
    """The time the cleanup after a failure may take: half the outage bound from the first
    cleanup call of a stage run, shared by every cleanup call that follows (end the run, delete a
    half-made version, put an alias back), so the bound holds however many there are."""

    def __init__(self) -> None:
        self.deadline: float | None = None

    def run(self, fn: Callable[[], T]) -> T:
        """`fn`, retried while the server may come back and the clock allows."""
        if self.deadline is None:
            self.deadline = time.monotonic() + outage_bound() / 2
        if time.monotonic() >= self.deadline:
            raise TrackingError("cleanup not attempted: the outage bound (PIPELINE_STAGE_OUTAGE_BOUND_S) is spent")
        return retrying(fn, until=self.deadline)
