"""The stage's MLflow run: params, metrics, artifacts, nested trial runs, and ending it."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_stage.mlflow_io.failures import (
    CleanupClock,
    concurrent_write,
    outage_bound,
    raise_classified,
    retrying,
    seconds_from_env,
)
from pipeline_stage.mlflow_io.tracking import redact


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Flatten nested manifest data into MLflow params (`chain.0.quantize.mode: int8`)."""
    out: dict[str, str] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, list):
        if not value:
            out[prefix] = "[]"
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}.{i}" if prefix else str(i)))
    else:
        out[prefix] = param_value(value)
    return out


def param_value(value: Any) -> str:
    """An MLflow param value: credentials redacted, cut to 6,000 characters (MLflow's limit)."""
    return redact(str(value))[:6000]


def tag_value(value: Any) -> str:
    """A registered version's tag value: floats to 6 significant digits, credentials redacted, and
    cut to 5,000 characters (under MLflow 3's limits: 8,000 for run tags, 100,000 for version tags,
    and short enough to read in the UI)."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return redact(str(value))[:5000]


ORPHAN_REASON = (
    "left RUNNING by a stage that is gone (its lease expired: killed, or the tracking server was unreachable when "
    "it ended); ended by a later run of the same chain on the same source"
)

# The run lease: a live stage says so on its run. The tag holds the lease's expiry (Unix seconds,
# the stage's own clock); a thread renews it every third of its length and the stage removes it
# when it ends the run. Another stage ends a RUNNING run of the same chain only once that expiry
# plus the clock-skew margin has passed (or, for a run that never had a lease, once it started
# longer ago than the outage bound).
LEASE_TAG = "pipeline_stage.lease_expires"
DEFAULT_LEASE_S = 30.0
DEFAULT_LEASE_SKEW_S = 30.0


def lease_seconds() -> float:
    """How long a run's lease lasts from each renewal (env ``PIPELINE_STAGE_LEASE_S``, default 30 s)."""
    return seconds_from_env("PIPELINE_STAGE_LEASE_S", DEFAULT_LEASE_S, 2.0)


def lease_skew_seconds() -> float:
    """The clock-skew margin a sweeping stage adds to another run's lease expiry, since the expiry
    was written by the other pod's clock (env ``PIPELINE_STAGE_LEASE_SKEW_S``, default 30 s)."""
    return seconds_from_env("PIPELINE_STAGE_LEASE_SKEW_S", DEFAULT_LEASE_SKEW_S, 0.0)


def lease_expired(tags: dict[str, str], start_time_ms: int | None, now: float) -> bool:
    """Whether a RUNNING run's stage is gone, judged at `now` (Unix seconds): its lease expired more
    than the skew margin ago; or it never had a lease (a stage before leases) and started longer
    ago than the outage bound."""
    raw = tags.get(LEASE_TAG)
    if raw is not None:
        try:
            return now > float(raw) + lease_skew_seconds()
        except ValueError:
            return True  # not a lease this stage wrote: nobody renews it
    started = (start_time_ms or 0) / 1000.0
    return now - started > outage_bound()


def lease_expiry(length: float) -> str:
    """The lease tag's value for a lease of `length` seconds from now."""
    return f"{time.time() + length:.3f}"


class Lease:
    """Renews a run's lease tag from a daemon thread, from construction until :meth:`stop`. A
    renewal that fails (an outage) is tried again at the next tick: the run stays live for up to
    one lease length after the last renewal that reached the server. `expiry` is the expiry the
    run was started with (Unix seconds)."""

    def __init__(self, client, run_id: str, length: float, expiry: float):
        self.client, self.run_id, self.length = client, run_id, length
        self.expiry = expiry  # the latest expiry the server holds
        self.lapsed = False  # whether that expiry ever passed before a renewal replaced it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="run-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.length / 3):
            value = lease_expiry(self.length)
            try:
                self.client.set_tag(self.run_id, LEASE_TAG, value)
            except Exception:  # the main thread meets the same outage and reports it
                continue
            self.lapsed = self.lapsed or time.time() > self.expiry
            self.expiry = float(value)

    def may_have_lapsed(self) -> bool:
        """Whether a sibling could have taken this run for gone (:func:`lease_expired` on its
        clock): the expiry the server held passed at some moment. Judged without the skew margin,
        so a True may be needless, a False never wrong."""
        return self.lapsed or time.time() > self.expiry

    def stop(self) -> None:
        """Stop renewing. A renewal in flight is not waited for beyond a second (in an outage it
        could take MLflow's whole retry budget): the worst it does is extend a dead run's lease by
        one length, and a FINISHED or FAILED run is never swept."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=1.0)

    def drop(self) -> None:
        """Remove the lease tag from the ended run (once, best effort: it says nothing about an
        ended run, and the sweep looks only at RUNNING ones)."""
        try:
            concurrent_write(lambda: self.client.delete_tag(self.run_id, LEASE_TAG), idempotent=True)
        except Exception:
            pass


class StageRun:
    """The MLflow run of one stage execution; ends FAILED unless `end("FINISHED")` is reached.

    Every call classifies what MLflow raises (:mod:`pipeline_stage.mlflow_io.failures`), naming
    what was being logged; the cleanup calls share one :class:`CleanupClock`."""

    def __init__(self, experiment: str, run_name: str | None = None, tags: dict[str, str] | None = None):
        import mlflow

        self.mlflow = mlflow
        self.client = mlflow.MlflowClient()
        self.cleanup = CleanupClock()
        length = lease_seconds()
        expiry = lease_expiry(length)
        # Metrics and the run's closing tags wait here and go in one log_batch: linked to the
        # logged model when there is one (flush), else when the run ends. MLflow's log_model would
        # otherwise read every metric's history back to link it (a round trip per metric).
        self._metrics: list = []
        self._tags: dict[str, str] = {}
        try:
            concurrent_write(lambda: mlflow.set_experiment(experiment), idempotent=False)
            # the lease is on the run from its first moment: no sibling ever sees it without one
            self.run = mlflow.start_run(run_name=run_name, tags={**(tags or {}), LEASE_TAG: expiry})
        except Exception as exc:
            raise_classified(exc, f"starting a run in experiment `{experiment}`")
        self.run_id = self.run.info.run_id
        self.lease = Lease(self.client, self.run_id, length, float(expiry))

    def _call(self, doing: str, fn, *args, idempotent: bool = False, **kwargs):
        try:
            return concurrent_write(lambda: fn(*args, **kwargs), idempotent=idempotent)
        except Exception as exc:
            raise_classified(exc, f"{doing} (run {self.run_id})")

    def log_params(self, params: dict[str, str]) -> None:
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._call("logging params", self.mlflow.log_params, dict(items[i : i + 100]))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Queue metrics for the run (the non-finite left out); they reach the server with
        :meth:`flush`, at the latest when the run ends."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._metrics.extend(Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None and np.isfinite(v))

    def set_tags(self, tags: dict[str, str]) -> None:
        """Queue tags for the run; they go with the next :meth:`flush`."""
        self._tags.update(tags)

    def flush(self, model_id: str | None = None) -> None:
        """Send what is queued in one log_batch (MLflow splits it past its per-request limits).
        With `model_id`, the step-0 metrics are also the logged model's (its page in the UI lists
        them), as MLflow's log_model links a run's metrics when it finds them on the run."""
        from mlflow.entities import Metric, RunTag

        metrics, tags = self._metrics, self._tags
        if not metrics and not tags:
            return
        if model_id is not None:
            metrics = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id) if m.step == 0 else m for m in metrics]
        self._call(
            "logging metrics and tags",
            self.client.log_batch,
            self.run_id,
            metrics=metrics,
            tags=[RunTag(k, str(v)) for k, v in tags.items()],
        )
        self._metrics, self._tags = [], {}

    def log_text(self, text: str, path: str) -> None:
        self._call(f"logging {path}", self.mlflow.log_text, text, path)

    def log_artifact(self, local: Path, artifact_path: str | None = None) -> None:
        self._call(f"uploading {local.name}", self.mlflow.log_artifact, str(local), artifact_path)

    def log_datasets(self, datasets: list[dict[str, Any]]) -> None:
        """Record the data the run used as its inputs (MLflow's dataset lineage: the run page's
        Datasets), each with its role as the context: `role`, `name`, `uri` (credentials already
        redacted), `digest` (of the content; MLflow files the record under :func:`record_digest`),
        `arrays` (dtype and shape by name) and `samples`."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [
            DatasetInput(
                Dataset(
                    name=d["name"],
                    digest=record_digest(d["digest"], d["uri"]),
                    source_type=d["uri"].split(":/", 1)[0] if ":/" in d["uri"] else "local",
                    source=json.dumps({"uri": d["uri"]}),
                    schema=json.dumps({"arrays": d["arrays"]}),
                    profile=json.dumps({"samples": d["samples"], "sha256": d["digest"]}),
                ),
                tags=[InputTag("mlflow.data.context", d["role"])],
            )
            for d in datasets
        ]
        if inputs:
            self._call(
                "logging the data sets as the run's inputs", self.client.log_inputs, self.run_id, datasets=inputs, idempotent=True
            )

    def end_orphans(self, match: dict[str, str]) -> list[str]:
        """End FAILED the RUNNING runs with the same `match` tags (the chain digest and the source)
        whose stage is gone (:func:`lease_expired`), and their trial runs, with a tag saying why;
        returns their ids. A live sibling's run (its lease renewed) is never touched. Two stages
        that sweep the same orphan at once both succeed: each write is idempotent."""
        running = self._call(
            "looking for runs left RUNNING",
            self.client.search_runs,
            [self.run.info.experiment_id],
            filter_string="attributes.status = 'RUNNING'",
            max_results=1000,
        )
        now = time.time()
        orphans = {
            r.info.run_id
            for r in running
            if r.info.run_id != self.run_id
            and all(r.data.tags.get(k) == v for k, v in match.items())
            and lease_expired(r.data.tags, r.info.start_time, now)
        }
        ended = [r.info.run_id for r in running if r.info.run_id in orphans or r.data.tags.get("mlflow.parentRunId") in orphans]
        for run_id in ended:
            for key, value in (("pipeline_stage.ended_by", self.run_id), ("pipeline_stage.end_reason", ORPHAN_REASON)):
                self._call("ending a run left RUNNING", self.client.set_tag, run_id, key, value, idempotent=True)
            self._call("ending a run left RUNNING", self.client.set_terminated, run_id, "FAILED", idempotent=True)
        return ended

    def child_run(
        self,
        name: str,
        *,
        params: dict[str, str],
        metrics: dict[str, float],
        tags: dict[str, str],
        artifacts: list[Path],
        failed: bool = False,
    ) -> str:
        """A finished nested run under this one (a search trial); returns its id. Tag and param values
        are bounded here, as MLflow requires (tag_value, param_value)."""
        from mlflow.entities import Metric, Param, RunTag

        try:
            experiment_id = self.run.info.experiment_id
            tags = {k: tag_value(v) for k, v in tags.items()}
            child = retrying(
                lambda: self.client.create_run(experiment_id, run_name=name, tags={"mlflow.parentRunId": self.run_id, **tags})
            )
            run_id = child.info.run_id
            now = int(time.time() * 1000)
            clean = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None and np.isfinite(v)]
            retrying(
                lambda: self.client.log_batch(
                    run_id,
                    metrics=clean,
                    params=[Param(k, param_value(v)) for k, v in params.items()],
                    tags=[RunTag("mlflow.runName", name)],
                )
            )
            for path in artifacts:
                if path.is_dir():
                    retrying(lambda p=path: self.client.log_artifacts(run_id, str(p)))
                elif path.exists():
                    retrying(lambda p=path: self.client.log_artifact(run_id, str(p)))
            retrying(lambda: self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED"))
        except Exception as exc:
            raise_classified(exc, f"logging search trial `{name}` (run {self.run_id})")
        return run_id

    def end(self, status: str) -> None:
        """End the run, what is queued sent first; a failed end is retried within the cleanup
        clock, then given up (the next run of the same chain ends it: end_orphans)."""
        try:
            self.lease.stop()
            if status == "FINISHED":
                self.flush()
                # A stage whose lease lapsed (its renewals failed through an outage longer than
                # the lease and the skew margin) may have been taken for gone: undo that mark.
                if self.lease.may_have_lapsed():
                    tags = self.client.get_run(self.run_id).data.tags
                    if "pipeline_stage.ended_by" in tags:
                        self.client.delete_tag(self.run_id, "pipeline_stage.ended_by")
                        self.client.delete_tag(self.run_id, "pipeline_stage.end_reason")
                self.mlflow.end_run(status=status)  # one request: ends it on the server and here
            else:
                try:  # what was measured before the failure still reaches the run
                    self.cleanup.run(self.flush)
                except Exception:
                    pass
                self.cleanup.run(lambda: self.client.set_terminated(self.run_id, status))
            self.lease.drop()
        except Exception as exc:
            if status == "FINISHED":
                raise_classified(exc, "ending the run")
            # Ending a failed run is best effort (the error being reported matters more): if the
            # server is gone for good, the run stays RUNNING until the next run ends it (end_orphans).
        finally:
            try:
                self.mlflow.end_run(status=status)  # clears the active run here (on the server: ended already)
            except Exception:
                pass


def record_digest(content_digest: str, uri: str) -> str:
    """The digest MLflow files a logged dataset under: 36 hex characters of the sha256 of its
    content digest and its URI. MLflow keeps one record per name and digest in an experiment and
    links every later run that logs the same pair to the first record, source included; with
    the content digest alone, a run whose data came from elsewhere would show, and hand a
    `dataset:<name>` entry, the first run's URI (a file that may be gone)."""
    return hashlib.sha256(f"{content_digest}\n{uri}".encode()).hexdigest()[:36]
