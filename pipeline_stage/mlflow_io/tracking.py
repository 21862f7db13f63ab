"""Which MLflow tracking server, whether it answers, and keeping secrets out of what we print."""

from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path

from pipeline_stage.contract.errors import TrackingError

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
    return re.sub(r"(?i)((?:token|password|secret|key)=)[^&\s]+", r"\1***", text)


def resolve_tracking_uri(cli_value: str | None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else a local sqlite store in the working directory."""
    uri = cli_value or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    return uri


def configure(uri: str) -> None:
    """Point MLflow at `uri`, with bounded retries and no console noise from MLflow itself."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow prints "View run at <tracking URI>" on stdout, credentials included: never.
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    # MLflow's advice about type hints and input examples is addressed to model authors, not to
    # the operator reading a pipeline step's log.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow(\.|$)")
    warnings.filterwarnings("ignore", message=r".*(type hints to the `predict`|input example was not provided)")
    import mlflow

    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:") and not os.environ.get("MLFLOW_REGISTRY_URI"):
        mlflow.set_registry_uri(uri)


def preflight(uri: str, *, attempts: int = 3, timeout: float = 5.0) -> None:
    """Fail fast (bounded time) with the URI in the message when the server does not answer."""
    if not uri.startswith(("http://", "https://")):
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
