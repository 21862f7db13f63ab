"""The registry's rules, on a registered model's versions and their tags: which earlier version
an identical stage reuses, which version an alias goes to, and how it is moved safely while
sibling stages register at the same time."""

from __future__ import annotations

import time
from typing import Any

from pipeline_stage.mlflow_io import integrity
from pipeline_stage.mlflow_io.failures import concurrent_write, is_missing

PASSED_TAG = "pipeline_stage.passed"  # "true" on a run and a version whose gates all passed
DEDUPLICATED = "pipeline_stage.deduplicate"  # on versions registered without --new-version


def all_versions(client, name: str) -> list:
    """Every version of a registered model (none if it does not exist)."""
    out, token = [], None
    while True:
        page = client.search_model_versions(f"name='{name}'", max_results=1000, page_token=token)
        out.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return out


def find_reusable(client, name: str, identity: dict[str, str], *, ready_only: bool = True, skip: frozenset = frozenset()) -> Any:
    """The earliest passing version registered for the same source version and chain digest
    (READY, or with `ready_only=False` any not FAILED_REGISTRATION); versions in `skip` are passed over.

    This makes a retried step (Kubeflow retries, a re-run pipeline) reuse its earlier result
    instead of registering version N+1 of the same thing.
    """
    for mv in sorted(all_versions(client, name), key=lambda v: int(v.version)):
        tags = mv.tags or {}
        if (
            (mv.status == "READY" if ready_only else mv.status != "FAILED_REGISTRATION")
            and str(mv.version) not in skip
            and tags.get(PASSED_TAG) == "true"
            and all(tags.get(k) == v for k, v in identity.items())
        ):
            return mv
    return None


def identity_of(tags: dict[str, str]) -> dict[str, str]:
    """What makes two registrations the same result, from a version's tags: the chain digest and
    the source version (for a source that is not a registered version: its URI and run)."""
    keys = ("source.name", "source.version") if "source.version" in tags else ("source.uri", "source.run_id")
    return {k: tags.get(k, "") for k in ("pipeline_stage.chain_digest", *keys)}


def _withdrawn(versions: list) -> set[str]:
    """Versions an identical stage is withdrawing: registered without --new-version while an
    earlier such version of the same chain on the same source exists (their stages delete them
    and reuse the earlier one, :func:`registered_first`), so the alias never goes to them."""
    first: dict[tuple, int] = {}
    for v in versions:
        tags = v.tags or {}
        if tags.get(DEDUPLICATED) == "true" and tags.get(PASSED_TAG) == "true" and v.status != "FAILED_REGISTRATION":
            key = tuple(identity_of(tags).items())
            first[key] = min(first.get(key, int(v.version)), int(v.version))
    return {
        str(v.version)
        for v in versions
        if (v.tags or {}).get(DEDUPLICATED) == "true"
        and int(v.version) > first.get(tuple(identity_of(v.tags or {}).items()), int(v.version))
    }


def alias_winner(versions: list, alias: str, excluded: frozenset = frozenset()) -> Any:
    """The rule: among READY versions that passed and asked for `alias`, the newest of the
    highest `register.priority`. Failed versions never win, nor do versions being withdrawn as
    duplicates, nor those in `excluded` (their stored files fail verification)."""
    passed_over = _withdrawn([v for v in versions if str(v.version) not in excluded]) | set(excluded)
    eligible = [
        v
        for v in versions
        if v.status == "READY"
        and str(v.version) not in passed_over
        and (v.tags or {}).get(PASSED_TAG) == "true"
        and (v.tags or {}).get("pipeline_stage.alias") == alias
    ]
    if not eligible:
        return None
    return max(eligible, key=lambda v: (int((v.tags or {}).get("pipeline_stage.priority", "0")), int(v.version)))


def settle_alias(client, name: str, alias: str, *, trusted: frozenset = frozenset(), attempts: int = 20) -> str | None:
    """Point `alias` at the rule's winner; re-check after writing, because aliases have no
    compare-and-set: a stage that registered meanwhile saw our version, so the last writer is right.

    The alias never moves to files that fail verification: a winner not in `trusted` (versions this
    stage has just checked itself) is verified first, and passed over when it fails. A winner
    deleted meanwhile (a duplicate withdrawn) sends the rule round again."""
    chosen = None
    verified, excluded = set(trusted), set()
    for _ in range(attempts):
        winner = alias_winner(all_versions(client, name), alias, frozenset(excluded))
        if winner is None:
            return None
        version = str(winner.version)  # an int from a local store, a str over REST
        if version == chosen:
            return chosen
        try:
            if version not in verified:
                if not integrity.verify_version(client, name, version, mv=winner).ok:
                    excluded.add(version)
                    continue
                verified.add(version)
            concurrent_write(lambda v=version: client.set_registered_model_alias(name, alias, v), idempotent=False)
        except Exception as exc:
            if is_missing(exc):  # deleted between the listing and now
                continue
            raise
        chosen = version
    return chosen


def until_ready(client, mv, seconds: float = 300):
    deadline = time.monotonic() + seconds
    while mv.status == "PENDING_REGISTRATION" and time.monotonic() < deadline:
        time.sleep(0.5)
        mv = client.get_model_version(mv.name, mv.version)
    return mv


def registered_first(client, name: str, identity: dict[str, str], *, mine: str) -> Any:
    """The earliest version of the same identity if it is older than `mine` and usable (READY and
    its stored files verified); None when `mine` is the one to keep.

    Every identical stage lists the versions after creating its own, and version numbers grow in
    creation order, so all of them see the same earliest version: exactly one keeps its own."""
    skip: set[str] = set()
    marked = {**identity, DEDUPLICATED: "true"}  # only versions whose stages apply this same rule
    while True:
        first = find_reusable(client, name, marked, ready_only=False, skip=frozenset(skip))
        if first is None or int(first.version) >= int(mine):
            return None
        first = until_ready(client, first, seconds=60)
        if first.status == "READY" and integrity.verify_version(client, name, str(first.version), mv=first).ok:
            return first
        skip.add(str(first.version))  # failed, or its files do not verify: not a version to reuse


def alias_holder(client, name: str, alias: str) -> str | None:
    """The version `alias` points at; None when the model or the alias does not exist (an outage
    is raised: taking it for "no alias" would delete the alias on cleanup)."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception as exc:
        if is_missing(exc):
            return None
        raise
