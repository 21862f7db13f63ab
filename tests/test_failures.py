"""The one mapping from what MLflow raises to the stage's errors, by cause (no server needed: the
exceptions are built as MLflow and requests build them; the real outages are in test_outages.py)."""

from __future__ import annotations

import time

import mlflow
import pytest
import requests
from mlflow.exceptions import MlflowException, RestException

from pipeline_stage.contract.errors import InputError, TrackingError
from pipeline_stage.mlflow_io.failures import CleanupClock, classify, is_missing, is_outage, retrying


@pytest.fixture(autouse=True)
def local_store(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")  # a local store always "answers"


def _wrapped_connection_error() -> MlflowException:
    """What MLflow's REST client raises when the server is gone: its exception, caused by requests'."""
    try:
        try:
            raise requests.exceptions.ConnectionError("Max retries exceeded (Connection refused)")
        except requests.exceptions.ConnectionError as inner:
            raise MlflowException("API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/get failed") from inner
    except MlflowException as exc:
        return exc


@pytest.mark.parametrize(
    "exc, kind",
    [
        (_wrapped_connection_error(), TrackingError),
        (RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "try later"}), TrackingError),
        (requests.exceptions.ReadTimeout("read timed out"), TrackingError),
        (RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "Run 'x' not found"}), InputError),
        (RestException({"error_code": "PERMISSION_DENIED", "message": "no"}), InputError),
        (RestException({"error_code": "INTERNAL_ERROR", "message": "database is locked"}), TrackingError),
    ],
)
def test_errors_are_classified_by_cause(exc, kind):
    error = classify(exc, "downloading `data.evaluation`")
    assert type(error) is kind, error
    if kind is TrackingError:
        assert "the MLflow tracking server" in error.message and "while downloading `data.evaluation`" in error.message


def test_a_5xx_answer_is_an_outage_and_a_404_is_missing():
    def http_error(status: int) -> requests.HTTPError:
        response = requests.Response()
        response.status_code = status
        return requests.HTTPError(f"{status}", response=response)

    assert is_outage(http_error(503)) and not is_missing(http_error(503))
    assert is_missing(http_error(404)) and not is_outage(http_error(404))
    assert "MLFLOW_TRACKING_TOKEN" in str(classify(http_error(401), "x"))  # refused credentials
    assert "lacks a permission" in str(classify(http_error(403), "x"))  # a permission the user lacks


def test_retrying_gives_up_at_once_on_what_retrying_cannot_fix():
    calls = []

    def missing():
        calls.append(1)
        raise RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "gone"})

    with pytest.raises(RestException):
        retrying(missing, attempts=5, delay=0.01)
    assert len(calls) == 1


def test_the_cleanup_clock_is_shared_and_bounded(monkeypatch):
    """Every cleanup call after a failure shares one deadline, half the outage bound."""
    monkeypatch.setenv("PIPELINE_STAGE_OUTAGE_BOUND_S", "6")
    clock = CleanupClock()

    def down():
        raise _wrapped_connection_error()

    start = time.monotonic()
    with pytest.raises(MlflowException):
        clock.run(down)
    assert time.monotonic() - start < 4.5  # half of 6 s, with room for a slow machine
    time.sleep(max(0.0, clock.deadline - time.monotonic()))
    with pytest.raises(TrackingError, match="outage bound"):
        clock.run(down)  # the bound is spent: not attempted again


def test_the_outage_bound_must_be_a_number(monkeypatch):
    monkeypatch.setenv("PIPELINE_STAGE_OUTAGE_BOUND_S", "soon")
    with pytest.raises(InputError, match="PIPELINE_STAGE_OUTAGE_BOUND_S"):
        CleanupClock().run(lambda: None)


def test_an_error_that_does_not_come_from_the_server_is_not_blamed_on_it():
    from pipeline_stage.mlflow_io.failures import raise_classified

    with pytest.raises(KeyError):
        raise_classified(KeyError("a bug"), "registering `m`")
    with pytest.raises(TrackingError, match="while registering `m`"):
        raise_classified(_wrapped_connection_error(), "registering `m`")


# What the server answered in the eight-stage runs (sqlite) and what PostgreSQL answers for
# the same race: a concurrent write, never bad input.
SQLITE_RACE = (
    "(sqlite3.IntegrityError) UNIQUE constraint failed: tags.key, tags.run_uuid\n"
    "[SQL: INSERT INTO tags (key, value, run_uuid) VALUES (?, ?, ?)]"
)
PG_RACE = '(psycopg.errors.UniqueViolation) duplicate key value violates unique constraint "tag_pk"'


@pytest.mark.parametrize(
    "exc",
    [
        RestException({"error_code": "BAD_REQUEST", "message": SQLITE_RACE}),
        RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": PG_RACE}),
        RestException({"error_code": "RESOURCE_ALREADY_EXISTS", "message": "Registered Model (name=x) already exists."}),
    ],
    ids=["sqlite", "postgresql", "already-exists"],
)
def test_a_concurrent_write_is_never_bad_input(exc):
    from pipeline_stage.mlflow_io.failures import concurrent_write, is_conflict

    assert is_conflict(exc) and not is_missing(exc)
    error = classify(exc, "ending a run left RUNNING")
    assert type(error) is TrackingError and "concurrently by another client" in error.message
    calls = []

    def write():
        calls.append(1)
        if len(calls) < 3:
            raise exc
        return "written"

    assert concurrent_write(write, idempotent=False) == "written" and len(calls) == 3  # retried
    calls.clear()

    def made_by_another():
        calls.append(1)
        raise exc

    assert concurrent_write(made_by_another, idempotent=True) is None
    assert len(calls) == 1  # an idempotent write someone else made is done

    def missing():
        raise RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "Run 'x' not found"})

    with pytest.raises(RestException):
        concurrent_write(missing, idempotent=True)
