"""Which MLflow tracking server, whether it answers, and keeping secrets out of what we print."""

from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path

from pipeline_stage.contract import errors
from pipeline_stage.contract.errors import InputError, TrackingError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# MLflow's own HTTP retries default to 7 with exponential backoff (minutes); a pipeline step
# should fail in bounded time instead (mlflow_io.failures: the outage bound). Operators can still
# raise these through the environment.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def redact(text: str) -> str:
    """Hide credentials in URIs (user:password@host) and token-like query parameters."""
    text = re.sub(r"(?<=://)[^/@\s:]+:[^/@\s]+@", "***:***@", text)
    text = re.sub(r"(?<=://)[^/@\s:]+@", "***@", text)
    return re.sub(r"(?i)((?:token|password|secret|key|signature|credential|sig)=)[^&\s]+", r"\1***", text)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, redacted and cut to 300 characters (for one-line errors)."""
    return redact(errors.first_line(exc))


def resolve_tracking_uri(cli_value: str | None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else a local sqlite store in the working directory."""
    uri = cli_value or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    return uri


def configure(uri: str) -> None:
    """Point MLflow at `uri`, with bounded retries and no console noise from MLflow itself."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # A pipeline step talks to its tracking server and nothing else: MLflow's usage telemetry
    # (a config fetch at import, events to an outside host) stays off unless the operator sets it.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # Where git is absent (the image), MLflow's run context would print GitPython's 20-line advice
    # three times per run; a pipeline step has no working tree to take a commit from anyway.
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    # MLflow prints "View run at <tracking URI>" on stdout, credentials included: never.
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    # MLflow's advice about type hints and input examples is addressed to model authors, not to
    # the operator reading a pipeline step's log.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow(\.|$)")
    warnings.filterwarnings("ignore", message=r".*(type hints to the `predict`|input example was not provided)")
    from pipeline_stage.engine.heavy_imports import import_heavy

    mlflow = import_heavy("mlflow")

    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:") and not os.environ.get("MLFLOW_REGISTRY_URI"):
        mlflow.set_registry_uri(uri)


def client():
    """An ``MlflowClient`` for the configured tracking URI (after :func:`preflight`: a store this
    install cannot open is refused there, with the fix)."""
    import mlflow

    return mlflow.MlflowClient()


def local_store_usable(uri: str) -> None:
    """A local store needs what a client-only install (the image) lacks: say so before MLflow's
    own error ("Model registry functionality is unavailable") reaches the operator."""
    if uri.startswith(("sqlite:", "postgresql", "mysql", "mssql")):
        import importlib.util

        if importlib.util.find_spec("sqlalchemy") is None or importlib.util.find_spec("alembic") is None:
            raise InputError(
                f"tracking store `{redact(uri)}` is a database, and this install has MLflow's client only "
                "(mlflow-skinny, as in the image)",
                hint="pass --tracking-uri http(s)://<your MLflow server> or set MLFLOW_TRACKING_URI; for a local "
                "store install the full MLflow: pip install 'pipeline-stage[local]'",
            )
    elif uri.startswith("file:") or (":" not in uri and not uri.startswith("databricks")):
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
            raise InputError(
                f"tracking store `{redact(uri)}` is a folder: MLflow 3 refuses file stores (maintenance mode)",
                hint="use a server (http://...) or sqlite:///mlflow.db (pip install 'pipeline-stage[local]'); "
                "MLFLOW_ALLOW_FILE_STORE=true opts into the file store",
            )


def preflight(uri: str, *, attempts: int = 3, timeout: float = 5.0) -> None:
    """Fail fast (bounded time) with the URI in the message when the server does not answer."""
    if not uri.startswith(("http://", "https://")):
        local_store_usable(uri)
        if uri.startswith("sqlite:///"):
            parent = Path(uri[len("sqlite:///") :]).expanduser().resolve().parent
            if not parent.is_dir():
                raise TrackingError(f"tracking store `{redact(uri)}`: folder {parent} does not exist")
        return
    import requests

    url = uri.rstrip("/") + "/health"
    last = None
    for attempt in range(attempts):
        try:
            response = requests.get(url, timeout=timeout)
            if response.status_code < 500:
                return
            last = f"HTTP {response.status_code}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        if attempt + 1 < attempts:
            time.sleep(min(2**attempt, 4))
    raise TrackingError(
        f"MLflow tracking server {redact(uri)} is unreachable ({last} after {attempts} attempts)",
        hint="start the server or fix --tracking-uri / MLFLOW_TRACKING_URI",
    )
