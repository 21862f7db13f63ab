"""What the stage registered, file by file: sha256 and size of every stored file, recorded where a
registry owner can read them (version tags, run tags, report.json, the KFP Model's metadata), and
the check that compares the stored copies with that record (`pipeline-stage verify`, every alias
move, the reuse of an earlier version).

Two places hold files: the logged pyfunc model (``model/<path>``: ``MLmodel``, the pyfunc's code,
``artifacts/model.tflite``, the environment files) and the stage's run (``run/tflite/model.tflite``).
A tag per file: ``pipeline_stage.sha256.<place>/<path>`` = ``<sha256 hex> <size in bytes>``.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline_stage.contract.errors import InputError, IntegrityError
from pipeline_stage.contract.report import FileDigest
from pipeline_stage.mlflow_io.failures import raise_classified
from pipeline_stage.mlflow_io.source import download_artifact, resolve

TAG_PREFIX = "pipeline_stage.sha256."
MODEL = "model"  # the logged pyfunc model's files
RUN = "run"  # the stage run's own artifacts (tflite/model.tflite)
# MLflow writes this next to a model it downloads through a models:/ URI; it is not stored
NOT_STORED = {"registered_model_meta"}
_VALUE = re.compile(r"^([0-9a-f]{64}) (\d+)$")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def digest_file(path: Path, place_path: str) -> FileDigest:
    return FileDigest(path=place_path, sha256=sha256_of(path), size=path.stat().st_size)


def digest_folder(root: Path, place: str) -> list[FileDigest]:
    """Every file under `root`, as `place`/relative path, sorted."""
    return [
        digest_file(p, f"{place}/{p.relative_to(root).as_posix()}")
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() not in NOT_STORED
    ]


def as_tags(files: list[FileDigest]) -> dict[str, str]:
    """The tags that record `files` (one per file)."""
    return {f"{TAG_PREFIX}{f.path}": f"{f.sha256} {f.size}" for f in files}


def from_tags(tags: dict[str, str]) -> list[FileDigest]:
    """The files a version's or a run's tags record (a malformed value is kept, and never matches)."""
    out = []
    for key, value in sorted(tags.items()):
        if key.startswith(TAG_PREFIX):
            m = _VALUE.match(value.strip())
            sha, size = (m.group(1), int(m.group(2))) if m else (value.strip() or "(malformed)", -1)
            out.append(FileDigest(path=key[len(TAG_PREFIX) :], sha256=sha, size=size))
    return out


@dataclass(frozen=True)
class Mismatch:
    """One file whose stored copy differs from the record (or is missing, or is not recorded)."""

    path: str
    expected: str  # sha256, or "(not recorded)"
    actual: str  # sha256, or "(missing)"

    def text(self) -> str:
        return f"{self.path}: stored sha256 {self.actual}, recorded {self.expected}"


def compare(expected: list[FileDigest], actual: list[FileDigest], places: set[str]) -> list[Mismatch]:
    """Mismatches between the record and the stored files, for the places both cover."""
    want = {f.path: f for f in expected if f.path.split("/", 1)[0] in places}
    have = {f.path: f for f in actual}
    out = []
    for path in sorted(want.keys() | have.keys()):
        w, h = want.get(path), have.get(path)
        if w is None:
            out.append(Mismatch(path, "(not recorded)", h.sha256))
        elif h is None:
            out.append(Mismatch(path, w.sha256, "(missing)"))
        elif (w.sha256, w.size) != (h.sha256, h.size):
            out.append(Mismatch(path, w.sha256, h.sha256))
    return out


def stored_model_files(client, name: str, version: str, into: Path) -> list[FileDigest]:
    """Download the version's logged model from where it is stored and digest every file."""
    try:
        location = client.get_model_version_download_uri(name, version)
    except Exception as exc:
        raise_classified(exc, f"locating the files of {name}/{version}", missing=f"model version {name}/{version}'s files")
    return stored_folder(location, into, f"{name}/{version}")


def stored_folder(uri: str, into: Path, what: str) -> list[FileDigest]:
    """Download a logged model's folder (`uri`: where it is stored, or its models:/m-... URI) and
    digest every stored file (``model/<path>``)."""
    local = download_artifact(uri, into / "model", f"downloading the files of {what}", f"the stored files of {what}")
    return digest_folder(local, MODEL)


def stored_run_file(run_id: str, path: str, into: Path) -> FileDigest:
    """Download one artifact of a run and digest it (recorded as ``run/<path>``)."""
    uri = f"runs:/{run_id}/{path}"
    return digest_file(download_artifact(uri, into / "run", f"downloading {uri}", f"artifact {uri}"), f"{RUN}/{path}")


@dataclass(frozen=True)
class Verdict:
    """What verify found for one model version (or run): every file checked, and the mismatches."""

    subject: str
    checked: list[FileDigest]
    mismatches: list[Mismatch]

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def raise_if_bad(self, doing: str) -> None:
        if self.mismatches:
            raise IntegrityError(
                f"{doing}: {self.subject}'s stored files do not match the digests recorded when it was registered: "
                + "; ".join(m.text() for m in self.mismatches),
                hint="the stored copies were altered or damaged after registration; register the model again "
                "(pipeline-stage run --new-version) and do not serve this version",
            )


def verify_version(client, name: str, version: str, *, mv=None) -> Verdict:
    """Download every stored copy of `name`/`version` (its logged model and its run's .tflite) and
    compare each file with the digests on the version's tags."""
    mv = mv or _version(client, name, version)
    subject = f"models:/{name}/{version}"
    expected = from_tags(mv.tags or {})
    if not expected:
        return Verdict(subject, [], [Mismatch("(every file)", "(not recorded: registered without digests)", "(not checked)")])
    with tempfile.TemporaryDirectory(prefix="pipeline-stage-verify-") as tmp:
        actual = stored_model_files(client, name, str(version), Path(tmp))
        places = {MODEL}
        run_id = (mv.tags or {}).get("pipeline_stage.run_id") or mv.run_id
        for f in expected:
            if f.path.startswith(RUN + "/") and run_id:
                actual.append(_stored_or_missing(run_id, f.path[len(RUN) + 1 :], Path(tmp)))
                places.add(RUN)
    return Verdict(subject, actual, compare(expected, actual, places))


def verify_run(client, run_id: str, path: str = "") -> Verdict:
    """Compare a run's recorded files (its tags) under `path` with their stored copies."""
    try:
        run = client.get_run(run_id)
    except Exception as exc:
        raise_classified(exc, f"reading run {run_id}", missing=f"run {run_id} does not exist")
    expected = [f for f in from_tags(run.data.tags) if f.path.startswith(RUN + "/") and f.path[len(RUN) + 1 :].startswith(path)]
    subject = f"runs:/{run_id}" + (f"/{path}" if path else "")
    if not expected:
        return Verdict(subject, [], [Mismatch(path or "(every file)", "(not recorded)", "(not checked)")])
    with tempfile.TemporaryDirectory(prefix="pipeline-stage-verify-") as tmp:
        actual = [_stored_or_missing(run_id, f.path[len(RUN) + 1 :], Path(tmp)) for f in expected]
    return Verdict(subject, actual, compare(expected, actual, {RUN}))


def _stored_or_missing(run_id: str, path: str, into: Path) -> FileDigest:
    try:
        return stored_run_file(run_id, path, into)
    except InputError:  # the artifact is gone: a mismatch, not an error of the command
        return FileDigest(path=f"{RUN}/{path}", sha256="(missing)", size=-1)


def _version(client, name: str, version: str):
    try:
        return client.get_model_version(name, str(version))
    except Exception as exc:
        raise_classified(exc, f"reading model version {name}/{version}", missing=f"model version {name}/{version} does not exist")


def verify_uri(client, uri: str) -> Verdict:
    """`models:/name/N` (or `latest`), `models:/name@alias` or `runs:/<run_id>[/path]`, verified."""
    if not uri.startswith(("models:/", "runs:/")):
        raise InputError(
            f"`{uri}` is not a model version or a run",
            hint="pass models:/<name>/<version>, models:/<name>@<alias> or runs:/<run_id>",
        )
    found = resolve(uri, client)
    if found.name and found.version:
        return verify_version(client, found.name, found.version)
    if uri.startswith("runs:/"):
        return verify_run(client, found.run_id, uri[len("runs:/") :].partition("/")[2].rstrip("/"))
    raise InputError(f"`{uri}` is a logged model, not a registered version", hint="pass models:/<name>/<version>")
