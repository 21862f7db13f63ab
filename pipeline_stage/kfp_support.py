"""What the KFP components run inside their containers (kept out of the component bodies, which
KFP serializes as source text, so the logic is importable, testable and versioned with the package)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any


def optimize(
    manifest: str,
    model_uri: str,
    tracking_uri: str,
    tflite_path: str,
    report_path: str,
    tflite_metadata: dict,
    log_metric,
    html_path: str | None = None,
    compiled_path: str | None = None,
    compiled_metadata: dict | None = None,
) -> dict[str, Any]:
    """Run the stage for a component; a failed gate is a result (passed=False), not a task failure.
    The compiled models of the manifest's `compile` targets go to the folder `compiled_path`, one
    `<compiler>_<soc>.tflite` each, described by target in `compiled_metadata`.

    Bad input (exit 2) and failures (exit 1) raise, so the task fails with the stage's message.
    """
    from pipeline_stage.host.plugin_host import get_host
    from pipeline_stage.manifest import parse_manifest
    from pipeline_stage.mlflow_io.tracking import resolve_tracking_uri
    from pipeline_stage.run.stage import RunOptions, run_stage

    host = get_host()
    loaded = parse_manifest(manifest, host, path="<manifest parameter>", model_uri=model_uri or None)
    work = Path(tempfile.mkdtemp(prefix="stage-"))
    options = RunOptions(
        tracking_uri=resolve_tracking_uri(tracking_uri or None),
        report_path=work / "report.json",
        output_path=Path(tflite_path),
        compiled_dir=Path(compiled_path) if compiled_path else None,
    )
    report = run_stage(loaded, host, options)
    for name, value in (report.candidate or {}).items():
        log_metric(name, value)
    for name, value in report.compared_baseline().items():  # what the candidate's values were compared with
        log_metric(f"baseline.{name}", value)
    for gate in report.gates:
        log_metric(f"gate.{gate.metric}.{gate.rule}", 1.0 if gate.passed else 0.0)
    log_metric("passed", 1.0 if report.passed else 0.0)
    registered = report.registered
    own = next((f for f in report.artifacts if f.path == "run/tflite/model.tflite"), None)
    tflite_metadata.update(
        {
            "passed": report.passed,
            "chain_digest": report.manifest.chain_digest,
            "registered_name": registered.name if registered else "",
            "registered_version": registered.version if registered else "",
            "registered_uri": registered.uri if registered else "",
            "mlflow_run_id": report.run_id or "",
            "source_uri": report.source.uri,
            # the Model artifact's file is the run's .tflite; the digests of every stored file too
            "sha256": own.sha256 if own else "",
            "size_bytes": own.size if own else 0,
            "files_sha256": {f.path: f.sha256 for f in report.artifacts},
        }
    )
    if compiled_metadata is not None:
        compiled_metadata.update(
            {
                c.target: {
                    "status": c.status,
                    "file": Path(c.artifact).name if c.artifact else "",
                    "sha256": c.sha256 or "",
                    "ops_offloaded": c.partition.get("share", 0.0),
                    "evaluated_here": c.evaluated,
                    "error": c.error or "",
                }
                for c in report.compiled
            }
        )
    shutil.copyfile(work / "report.md", report_path)
    if html_path:
        shutil.copyfile(work / "report.html", html_path)
    return {
        "passed": report.passed,
        "model_version": registered.version if registered else "",
        "registered_model": registered.name if registered else "",
    }


def _client(tracking_uri: str):
    """An MlflowClient for the given URI (empty: MLFLOW_TRACKING_URI), with the stage's settings."""
    import mlflow

    from pipeline_stage.mlflow_io.tracking import configure, resolve_tracking_uri

    configure(resolve_tracking_uri(tracking_uri or None))
    return mlflow.MlflowClient()


def resolve_model(model_uri: str, tracking_uri: str) -> str:
    """Pin an alias to the version it points at now (models:/name@alias -> models:/name/N)."""
    from pipeline_stage.mlflow_io.source import resolve

    info = resolve(model_uri, _client(tracking_uri))
    return f"models:/{info.name}/{info.version}" if info.name and info.version else model_uri


def promote(name: str, version: str, alias: str, tracking_uri: str) -> str:
    """Move `alias` to `name`/`version`, refusing a version that did not pass its gates or whose
    stored files do not match the digests recorded when it was registered."""
    from pipeline_stage.mlflow_io.integrity import verify_version
    from pipeline_stage.mlflow_io.registry_rules import PASSED_TAG

    client = _client(tracking_uri)
    mv = client.get_model_version(name, version)
    if mv.tags.get(PASSED_TAG) != "true":
        raise RuntimeError(f"refusing to promote {name}/{version}: its gates did not pass")
    verify_version(client, name, version, mv=mv).raise_if_bad(f"refusing to promote {name}/{version}")
    client.set_registered_model_alias(name, alias, version)
    return f"models:/{name}@{alias}"


def pick_best(names: list[str], versions: list[str], passed: list[bool], objective: str, alias: str, tracking_uri: str) -> str:
    """Among the passing candidates, the one with the lowest `metric.<objective>` tag; promote it."""
    client = _client(tracking_uri)
    best = None
    sources = set()
    for name, version, ok in zip(names, versions, passed):
        if not ok or not version:
            continue
        tags = client.get_model_version(name, version).tags
        sources.add((tags.get("source.name"), tags.get("source.version")))
        value = float(tags[f"metric.{objective}"])
        if best is None or (value, int(version)) < (best[0], int(best[2])):
            best = (value, name, version)
    if best is None:
        raise RuntimeError(f"no candidate passed its gates ({len(versions)} tried): nothing promoted")
    if len(sources) > 1:
        raise RuntimeError(
            f"candidates come from different source versions {sorted(sources)} (the alias moved "
            "during the fan-out): nothing promoted; run the pipeline again"
        )
    return promote(best[1], best[2], alias, tracking_uri)


def docker_runner(**container_run_args) -> Any:
    """``kfp.local.DockerRunner(**container_run_args)`` whose tasks fail when their container fails.

    kfp 2.17's DockerRunner starts each container with ``auto_remove=True`` and reads its exit
    status afterwards; a container already removed by then counts as a success, so a component that
    fails within seconds (bad input) reports SUCCESS with no outputs (kubeflow/pipelines#13332; the
    fix proposed upstream, #13907, is what this does). This keeps each container until its status
    is read, then removes it. Use it in place of ``local.DockerRunner``; until kfp fixes the bug."""
    from kfp import local
    from kfp.local import docker_task_handler

    docker_task_handler.run_docker_container = _run_keeping_status
    return local.DockerRunner(**container_run_args)


def _run_keeping_status(client, image: str, command: list[str], volumes: dict, **container_run_args) -> int:
    from kfp.local.docker_task_handler import add_latest_tag_if_not_present

    image = add_latest_tag_if_not_present(image)
    if not any(image in (i.tags + i.attrs.get("RepoDigests", [])) for i in client.images.list()):
        client.images.pull(image)
    container = client.containers.run(
        image=image, command=command, detach=True, stdout=True, stderr=True, volumes=volumes, **container_run_args
    )
    try:
        for line in container.logs(stream=True):
            print(line.decode(), end="")
        return container.wait()["StatusCode"]
    finally:
        container.remove(force=True)
