"""The object stores that MLflow keeps artifacts in when the stage talks to them itself (a server
started with ``--no-serve-artifacts``, or a run whose artifact root is ``s3://``, ``gs://`` or
``wasbs://``): which client each needs and which extra installs it, where each client takes its
credentials from, a probe that the stage can reach a store before any heavy work, and what the
stores' errors mean (:func:`store_error`, which :func:`mlflow_io.failures.classify` asks first).

Credentials always come from the client's own default chain, so pod identities work as well as
static keys: boto3's (environment, shared files, IRSA web identity, EKS Pod Identity, instance
roles), Google's Application Default Credentials (a key file, GKE workload identity), and for Azure
MLflow's order (a connection string, an account key, else azure-identity's DefaultAzureCredential,
which covers AKS workload identity and managed identities).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from urllib.parse import urlparse

from pipeline_stage.contract.errors import InputError, StageError, TrackingError, causes
from pipeline_stage.mlflow_io.tracking import first_line, redact


@dataclass(frozen=True)
class ObjectStore:
    """One kind of object store: its URI scheme, the modules MLflow's artifact repository for it
    imports, the extra of this package that installs them, and the packages its client's
    exceptions come from."""

    name: str
    scheme: str
    extra: str
    modules: tuple[str, ...]
    packages: tuple[str, ...]


STORES = (
    ObjectStore("S3", "s3", "s3", ("boto3",), ("boto3", "botocore", "s3transfer")),
    # not all of `google`: protobuf is TensorFlow's and MLflow's too
    ObjectStore(
        "Google Cloud Storage",
        "gs",
        "gcs",
        ("google.cloud.storage",),
        ("google.cloud", "google.api_core", "google.auth", "google.resumable_media"),
    ),
    ObjectStore("Azure Blob Storage", "wasbs", "azure", ("azure.storage.blob", "azure.identity"), ("azure", "msal")),
)


def client_store(module: str) -> ObjectStore | None:
    """The store whose client `module` (a dotted name) is part of, if any."""
    return next((s for s in STORES if any(module == p or module.startswith(p + ".") for p in s.packages)), None)


def is_client_module(module: str) -> bool:
    """Whether `module` (a dotted name) is part of an object store's client."""
    return client_store(module) is not None


DENIED_CODES = {
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AuthorizationFailure",
    "AuthorizationPermissionMismatch",
    "AuthenticationFailed",
    "InsufficientAccountPermissions",
}
MISSING_CODES = {"NoSuchBucket", "ContainerNotFound", "InvalidBucketName"}


def store_of(uri: str) -> ObjectStore | None:
    """The object store a URI is on (None for the tracking server's proxy, a local path, ...)."""
    scheme = urlparse(uri).scheme.lower()
    return next((s for s in STORES if s.scheme == scheme), None)


def bucket_of(uri: str) -> str:
    """The bucket (S3, GCS) or ``container@account`` (Azure) of an object-store URI."""
    parsed = urlparse(uri)
    host = parsed.netloc.split(".blob.", 1)[0] if parsed.scheme == "wasbs" else parsed.netloc
    return f"{parsed.scheme}://{host}"


def missing_modules(store: ObjectStore) -> list[str]:
    """The modules MLflow needs for `store` that this install cannot import."""
    missing = []
    for module in store.modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package is absent
            found = False
        if not found:
            missing.append(module)
    return missing


def _missing_client(store: ObjectStore, uri: str, what: str) -> InputError:
    modules = ", ".join(missing_modules(store)) or ", ".join(store.modules)
    return InputError(
        f"{what} is on {store.name} (`{redact(uri)}`), and this install has no client for it (no {modules})",
        hint=f"pip install 'pipeline-stage[{store.extra}]' (the image has the s3 and gcs clients)",
    )


def credential_source(store: ObjectStore) -> str:
    """Where the store's client takes its credentials from, here and now (never the secret)."""
    if store.scheme == "s3":
        try:
            import boto3

            found = boto3.Session().get_credentials()
        except Exception:  # a broken profile names itself in the store's own error
            found = None
        method = getattr(found, "method", None)
        source = {
            "env": "environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)",
            "shared-credentials-file": "the shared credentials file (AWS_SHARED_CREDENTIALS_FILE, AWS_PROFILE)",
            "config-file": "the AWS config file (AWS_CONFIG_FILE, AWS_PROFILE)",
            "assume-role-with-web-identity": "web identity (IRSA: AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE)",
            "container-role": "container credentials (EKS Pod Identity / ECS task role)",
            "iam-role": "the instance metadata service (the node's IAM role)",
        }.get(method or "", method or "none found in boto3's default chain")
        endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL")
        return f"{source}" + (f"; endpoint MLFLOW_S3_ENDPOINT_URL={redact(endpoint)}" if endpoint else "")
    if store.scheme == "gs":
        if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
            return "the key file in GOOGLE_APPLICATION_CREDENTIALS"
        return "Application Default Credentials (gcloud's file, or the metadata server: GKE workload identity)"
    if os.environ.get("AZURE_STORAGE_CONNECTION_STRING"):
        return "the connection string in AZURE_STORAGE_CONNECTION_STRING"
    if os.environ.get("AZURE_STORAGE_ACCESS_KEY"):
        return "the account key in AZURE_STORAGE_ACCESS_KEY"
    return "DefaultAzureCredential (AZURE_CLIENT_ID / AZURE_TENANT_ID / AZURE_FEDERATED_TOKEN_FILE: workload identity; or a managed identity)"


def _from_client(e: BaseException) -> bool:
    return is_client_module(type(e).__module__)


def _code_and_status(e: BaseException) -> tuple[str, int | None]:
    response = getattr(e, "response", None)
    if isinstance(response, dict):  # botocore's ClientError
        error = response.get("Error", {})
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(error.get("Code", "")), status if isinstance(status, int) else None
    code = getattr(e, "error_code", None) or ""  # azure-core
    status = getattr(e, "status_code", None) or getattr(e, "code", None)  # azure-core / google-api-core
    return str(code), status if isinstance(status, int) else None


def _bucket_in(exc: BaseException, uri: str | None) -> str:
    if uri and store_of(uri):
        return bucket_of(uri)
    for e in causes(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("BucketName"):
            return f"s3://{response['Error']['BucketName']}"
    return "(the bucket named in the error)"


def store_error(exc: BaseException, doing: str, *, uri: str | None = None) -> StageError | None:
    """The stage's error for an object store's exception anywhere in `exc`'s chain (None when
    there is none): a client that is not installed or a store that refuses access or has no such
    bucket is bad input (exit 2, naming the bucket and the credential source); a store that does
    not answer, times out or answers 5xx is an outage (exit 1, as the tracking server's)."""
    for e in causes(exc):
        if isinstance(e, ModuleNotFoundError) and is_client_module(e.name or ""):
            store = store_of(uri or "") or client_store(e.name or "")
            return _missing_client(store, uri or f"{store.scheme}://", f"an artifact location used while {doing}")
    from_client = [e for e in causes(exc) if _from_client(e)]
    if not from_client:
        return None
    culprit = from_client[0]
    store, bucket = store_of(uri or "") or client_store(type(culprit).__module__), _bucket_in(exc, uri)
    name = type(culprit).__name__
    code, status = next(((c, s) for c, s in map(_code_and_status, from_client) if c or s), ("", None))
    if any(word in name for word in ("Connection", "Timeout", "ServiceRequest", "ServiceResponse")) or (status or 0) >= 500:
        return TrackingError(
            f"{store.name} ({bucket}) did not answer while {doing}: {first_line(culprit)}",
            hint="the object store is unreachable or failing (nothing was registered and no alias moved); "
            "retry the step once it answers",
        )
    if code in MISSING_CODES or (name == "NotFound" and store.scheme == "gs" and "bucket" in str(culprit).lower()):
        return InputError(
            f"{store.name} bucket {bucket} does not exist (while {doing}; credentials: {credential_source(store)})",
            hint="create the bucket, or point the experiment's artifact root / the server's --default-artifact-root at one that exists",
        )
    denied_names = ("NoCredentials", "PartialCredentials", "CredentialRetrieval", "DefaultCredentials", "RefreshError")
    if (
        code in DENIED_CODES
        or status in (401, 403)
        or any(w in name for w in (*denied_names, "ClientAuthentication", "CredentialUnavailable"))
    ):
        return InputError(
            f"{store.name} refused access to {bucket} while {doing}: {first_line(culprit)} "
            f"(credentials: {credential_source(store)})",
            hint=f"give that identity read and write access to {bucket}, or set the credentials the pod should use "
            "(docs/mlflow.md: Object stores and permissions)",
        )
    return None


def underlying_uri(uri: str) -> str:
    """Where a ``models:/`` or ``runs:/`` URI's files are (an ``s3://`` URI, say), as MLflow
    resolves it for a download; any other URI unchanged."""
    if not uri.startswith(("models:/", "runs:/")):
        return uri
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(uri)
    while hasattr(repo, "repo"):  # Models- and RunsArtifactRepository wrap the store's repository
        repo = repo.repo
    return getattr(repo, "artifact_uri", uri)


def probe(uri: str, what: str) -> None:
    """Check that the stage can talk to the object store `uri` is on (list one level there) before
    any heavy work; nothing for a URI that is not on an object store. `what` names it for the
    message ("the source model `models:/m/1`")."""
    store = store_of(uri)
    if store is None:
        return
    if missing_modules(store):
        raise _missing_client(store, uri, what)
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        get_artifact_repository(uri).list_artifacts()
    except Exception as exc:
        error = store_error(exc, f"listing {what} ({redact(uri)})", uri=uri)
        if error is None:
            raise
        raise error from exc


def probe_all(places: dict[str, str]) -> None:
    """:func:`probe` each place a run touches ({what: URI}: the source model, the run's artifact
    root, data named by URI), through what MLflow resolves ``models:/`` and ``runs:/`` URIs to."""
    for what, uri in places.items():
        probe(underlying_uri(uri), what)
