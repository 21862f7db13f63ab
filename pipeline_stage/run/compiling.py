"""The compile phase: the settled portable model compiled for each accelerator target of the
manifest's `compile` section, and each compiled model that this machine can run evaluated like any
candidate (the same metrics and gates, on the same data).

A target whose compiler is missing stops the stage before any work (:func:`check_available`). A
target whose compiler refuses the model (`rejected`), or whose compiled model this machine's
runtime refuses to load or run (`failed`), is that target's failure in the report, nothing
registered for it; the other targets and the portable model go on. A compiled model that cannot
run here at all is "not evaluated here", never passing.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline_stage.contract.compilers import CompileRejected
from pipeline_stage.contract.errors import PluginError, StageError, first_line, plugin_failures
from pipeline_stage.contract.gates import Gate, evaluate_gates
from pipeline_stage.contract.report import CompiledRecord
from pipeline_stage.engine.source_model import outputs_by_name
from pipeline_stage.host.plugin_host import PluginHost
from pipeline_stage.run.evaluation import EvaluationContext
from pipeline_stage.run.measuring import measure

COMPILED_DIR = "compiled"  # in the work folder, and in the registered model's artifacts


def check_available(targets: list[Any]) -> None:
    """Refuse (exit 2) a target whose compiler or SDK this install lacks: before any download or run."""
    for target in targets:
        reason = target.compiler.unavailable(target.soc, target.options)
        if reason:
            raise target.compiler.refuse(target.soc, reason)


def compile_targets(
    targets: list[Any],
    model_bytes: bytes,
    workdir: Path,
    *,
    measuring: "Measuring | None",
    log: Callable[[str], None],
) -> tuple[list[CompiledRecord], dict[str, Path]]:
    """Each target compiled (and evaluated where it runs here): the records for the report, and
    the compiled files by target key, to register beside the portable model."""
    records, files = [], {}
    (workdir / COMPILED_DIR).mkdir(parents=True, exist_ok=True)
    for target in targets:
        log(f"{target.name}: compiling")
        try:
            with plugin_failures(f"compiler `{target.compiler.name}` on {target.name}", CompileRejected):
                compiled = target.compiler.compile(model_bytes, target.soc, target.options)
        except CompileRejected as exc:
            log(f"{target.name}: the compiler refused the model: {exc}")
            records.append(CompiledRecord(target=target.name, status="rejected", error=str(exc)))
            continue
        if compiled.stamp and compiled.stamp.get("soc") != target.soc:
            raise PluginError(f"compiler `{target.compiler.name}` made a model stamped {compiled.stamp} for {target.name}")
        record = CompiledRecord(
            target=target.name,
            status="compiled",
            partition=compiled.partition.record(),
            artifact=f"artifacts/{target.key}.tflite",
            size_bytes=len(compiled.model_bytes),
            sha256=hashlib.sha256(compiled.model_bytes).hexdigest(),
            stamp=compiled.stamp,
            sdk=compiled.sdk,
        )
        share = compiled.partition.share
        log(f"{target.name}: {compiled.partition.offloaded}/{compiled.partition.ops} ops offloaded ({share:.0%})")
        try:
            record = _measured(target, compiled, record, measuring)
        except StageError:
            raise
        except Exception as exc:  # the runtime refused what the compiler made: that target's failure
            log(f"{target.name}: the compiled model does not run here: {first_line(exc)}")
            update = {"status": "failed", "error": f"the compiled model does not run here: {first_line(exc)}", "artifact": None}
            records.append(record.model_copy(update=update))
            continue
        path = workdir / COMPILED_DIR / f"{target.key}.tflite"
        path.write_bytes(compiled.model_bytes)
        files[target.key] = path
        records.append(record)
    return records, files


def _measured(target: Any, compiled: Any, record: CompiledRecord, measuring: "Measuring | None") -> CompiledRecord:
    """The record with the compiled model's measurements where it runs here, else why not."""
    runner = target.compiler.runner(compiled, target.soc, target.options) if measuring is not None else None
    if runner is not None:
        return measuring.evaluate(record, runner)
    why = f"{target.name} code runs on the device only" if measuring is not None else "compile.evaluate is false"
    return record.model_copy(update={"not_evaluated": why})


class Measuring:
    """How the stage measured its candidate, applied to a compiled model: the metrics computed on
    predictions (accuracy, fidelity, ...) and the gates on them. What reads or times the file itself
    (size, latency, coverage) is the portable model's; a compiled file's size is in its record."""

    def __init__(
        self,
        host: PluginHost,
        evaluation: EvaluationContext,
        names: list[str],
        gates: list[Gate],
        baseline: dict[str, float],
    ):
        self.host, self.evaluation, self.gates, self.baseline = host, evaluation, gates, baseline
        self.names = [n for n in names if host.metric_class(n).uses == "predictions"]

    def evaluate(self, record: CompiledRecord, runner: Callable[[Any], dict]) -> CompiledRecord:
        ev = self.evaluation

        def predict_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            feed = {k: np.asarray(v, dtype=np.float32) for k, v in batch.items()}
            return outputs_by_name(runner(feed if len(feed) > 1 else next(iter(feed.values()))), ev.output_names)

        values = measure(self.host, ev, self.names, model_bytes=None, outputs=lambda: ev.predict(predict_batch)).values
        gates = [g for g in self.gates if g.metric in values]
        higher = {g.metric: self.host.metric_class(g.metric).higher_is_better for g in gates}
        results, _ = evaluate_gates(gates, values, self.baseline, higher)
        return record.model_copy(update={"evaluated": True, "metrics": values, "gates": results})
