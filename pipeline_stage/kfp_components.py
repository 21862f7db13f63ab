"""The stage as KFP v2 components, and the example pipelines built from them.

Python components on the stage's image (``base_image=IMAGE``, ``install_kfp_package=False``): the
image already holds the package, kfp and TensorFlow, so nothing is installed at run time, the same
code runs in tests under ``kfp.local.SubprocessRunner`` (which cannot run container components
without Docker), and typed artifact outputs (Model metadata, Metrics) come for free.

MLflow credentials come from the environment (``MLFLOW_TRACKING_TOKEN`` or
``MLFLOW_TRACKING_USERNAME``/``PASSWORD``, set from a Kubernetes secret), never from parameters.
"""

import os
from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Markdown, Metrics, Model, Output

from pipeline_stage import __version__

IMAGE = os.environ.get("PIPELINE_STAGE_IMAGE", f"localhost/pipeline-stage:{__version__}")


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def optimize_tflite(
    manifest: str,
    model_uri: str,
    tflite: Output[Model],
    metrics: Output[Metrics],
    report: Output[Markdown],
    report_html: Output[HTML],
    compiled: Output[Artifact],
    tracking_uri: str = "",
    stage_version: str = "0.1.0",  # KFP copies this source text: keep it equal to __version__ (a test checks)
) -> NamedTuple("OptimizeOutputs", [("passed", bool), ("model_version", str), ("registered_model", str)]):
    """Optimize a model from MLflow into a gated, registered .tflite.

    manifest: the manifest's YAML text. model_uri: overrides its `model:` (pin it to a version, e.g.
    with resolve_model, so cached results stay right). tracking_uri: empty means MLFLOW_TRACKING_URI.
    stage_version: part of the cache key, so a new image never reuses an old result.
    Outputs: the .tflite (metadata: registered name/version/uri, passed), every metric and gate
    verdict, the Markdown and HTML reports (the KFP UI shows both); `compiled`: a folder with one
    compiled model per `compile` target (metadata by target: status, file, sha256, ops offloaded);
    `passed` and `model_version` for dsl.If.
    """
    from collections import namedtuple

    from pipeline_stage.kfp_support import optimize

    result = optimize(
        manifest,
        model_uri,
        tracking_uri,
        tflite.path,
        report.path,
        tflite.metadata,
        metrics.log_metric,
        report_html.path,
        compiled.path,
        compiled.metadata,
    )
    outputs = namedtuple("OptimizeOutputs", ["passed", "model_version", "registered_model"])
    return outputs(result["passed"], result["model_version"], result["registered_model"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def resolve_model(model_uri: str, tracking_uri: str = "") -> str:
    """Pin `models:/name@alias` to `models:/name/N` (run uncached: aliases move)."""
    from pipeline_stage.kfp_support import resolve_model as resolve

    return resolve(model_uri, tracking_uri)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(name: str, version: str, alias: str, tracking_uri: str = "") -> str:
    """Move `alias` to a version whose gates passed; returns models:/name@alias."""
    from pipeline_stage.kfp_support import promote as move_alias

    return move_alias(name, version, alias, tracking_uri)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def pick_and_promote(
    names: List[str], versions: List[str], passed: List[bool], objective: str, alias: str, tracking_uri: str = ""
) -> str:
    """Promote the passing candidate with the lowest `objective` metric (e.g. size_bytes)."""
    from pipeline_stage.kfp_support import pick_best

    return pick_best(names, versions, passed, objective, alias, tracking_uri)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def gate_verdict(passed: bool) -> bool:
    """The optimize task's `passed` as a single output, for dsl.If.

    kfp.local (2.17) resolves conditions only on a task's single `Output`, not on one of several
    named outputs; this keeps the pipeline runnable locally and costs one tiny task on a cluster.
    """
    return passed


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_digits(tracking_uri: str = "", epochs: int = 8, registered_model: str = "digits-cnn") -> str:
    """Example training step: a small CNN on offline digits, logged and registered in MLflow."""
    from pipeline_stage.demo import digits_data, log_source_model, train_digits_cnn
    from pipeline_stage.mlflow_io.tracking import configure, resolve_tracking_uri

    configure(resolve_tracking_uri(tracking_uri or None))
    data = digits_data()
    logged = log_source_model(train_digits_cnn(data, epochs=epochs), data, name=registered_model, alias=None)
    return logged["uri"]


@dsl.pipeline(name="train-optimize-promote")
def train_optimize_promote(
    manifest: str, alias: str = "production-edge", tracking_uri: str = "", epochs: int = 8, source_model: str = "digits-cnn"
):
    """Train, optimize with the stage, and promote only if every gate passed."""
    train = train_digits(tracking_uri=tracking_uri, epochs=epochs, registered_model=source_model)
    train.set_caching_options(False)
    opt = optimize_tflite(manifest=manifest, model_uri=train.output, tracking_uri=tracking_uri)
    verdict = gate_verdict(passed=opt.outputs["passed"])
    with dsl.If(verdict.output == True):  # noqa: E712 - a KFP condition, not Python
        promote(
            name=opt.outputs["registered_model"], version=opt.outputs["model_version"], alias=alias, tracking_uri=tracking_uri
        )


@dsl.pipeline(name="fan-out-optimize")
def fan_out_optimize(
    model_uri: str, manifests: List[str], objective: str = "size_bytes", alias: str = "production-edge", tracking_uri: str = ""
):
    """Try several manifests in parallel on one model version; promote the best passing one.

    Each branch pins the model URI to a version first (uncached), so the optimize task's cache key
    holds the version, not a movable alias; the pick refuses candidates from different versions.
    (Pinning once before the loop would be cheaper, but kfp.local 2.17 hands a loop body the loop
    item in place of an upstream task's output.)
    """
    with dsl.ParallelFor(manifests) as manifest:
        source = resolve_model(model_uri=model_uri, tracking_uri=tracking_uri)
        source.set_caching_options(False)
        opt = optimize_tflite(manifest=manifest, model_uri=source.output, tracking_uri=tracking_uri)
    pick = pick_and_promote(
        names=dsl.Collected(opt.outputs["registered_model"]),
        versions=dsl.Collected(opt.outputs["model_version"]),
        passed=dsl.Collected(opt.outputs["passed"]),
        objective=objective,
        alias=alias,
        tracking_uri=tracking_uri,
    )
    pick.set_caching_options(False)


COMPILED = {
    "optimize_tflite_component.yaml": optimize_tflite,
    "train_optimize_promote_pipeline.yaml": train_optimize_promote,
    "fan_out_optimize_pipeline.yaml": fan_out_optimize,
}


def compile_all(out_dir: str) -> list[str]:
    """Write the compiled component and pipelines to `out_dir` (manifests/kfp in the repository)."""
    from kfp import compiler

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, obj in COMPILED.items():
        path = os.path.join(out_dir, name)
        compiler.Compiler().compile(obj, path)
        written.append(path)
    return written


if __name__ == "__main__":  # python -m pipeline_stage.kfp_components manifests/kfp
    import sys

    for p in compile_all(sys.argv[1] if len(sys.argv) > 1 else "manifests/kfp"):
        print(p)
