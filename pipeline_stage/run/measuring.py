"""Measuring one model: the metrics plugins registered, on its outputs by name.

A model with several outputs gets every metric computed on predictions per output
(`<metric>.<output>`), and the plain name is the worst output's value, so a gate on
`fidelity_sqnr_db` sees the most damaged output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline_stage.contract.errors import InputError, PluginError, StageError
from pipeline_stage.contract.metrics import Evaluation
from pipeline_stage.contract.report import TimedComparison
from pipeline_stage.engine.evaluate import alternating_latencies_ms, default_threads, latencies_ms
from pipeline_stage.engine.source_model import aligned_names, tflite_predict_batch
from pipeline_stage.host.plugin_host import PluginHost
from pipeline_stage.run.evaluation import EvaluationContext, Outputs


@dataclass(frozen=True)
class Measurement:
    """One model's metrics by name; with a baseline beside it, its timed metrics' rounds too."""

    values: dict[str, float]
    timed: list[TimedComparison] = field(default_factory=list)


def measure(
    host: PluginHost,
    ctx: EvaluationContext,
    names: list[str],
    *,
    model_bytes: bytes | None = None,
    outputs: Callable[[], Outputs] | None = None,
    beside: bytes | None = None,
) -> Measurement:
    """The metrics among `names` of one model: the baseline, a chain's step, the stage's candidate
    or a search trial's, all measured here.

    Predictions are `outputs()` (the model's outputs by name on the evaluation data) when given,
    else the .tflite's, run in :meth:`EvaluationContext.predict`'s loop. A model with several
    outputs also gets `<metric>.<output>` for every metric computed on predictions, and the plain
    name is the worst output's value. With `beside` (the baseline's .tflite), the timed metrics
    (latency) are timed in alternating rounds beside it (:func:`timed_side_by_side`); without, alone.
    """
    timed = timed_side_by_side(host, ctx, names, baseline_bytes=beside, candidate_bytes=model_bytes) if beside else []
    done = {t.metric for t in timed}
    values = _measure(host, ctx, [n for n in names if n not in done], model_bytes=model_bytes, outputs=outputs)
    values.update({t.metric: t.candidate for t in timed})
    return Measurement(values, timed)


def _measure(
    host: PluginHost,
    ctx: EvaluationContext,
    names: list[str],
    *,
    model_bytes: bytes | None,
    outputs: Callable[[], Outputs] | None,
) -> dict[str, float]:
    ev_data = ctx.evaluation
    output_names = ctx.output_names
    flex = _flex_ops(model_bytes) if model_bytes is not None and outputs is None else []
    on_predictions = any(host.metric_class(n).uses == "predictions" for n in names)
    if outputs is None and on_predictions and not flex:
        from pipeline_stage.engine.litert_runtime import TFLiteModel

        model = TFLiteModel(model_bytes, threads=ctx.spec.threads or default_threads())
        output_names = aligned_names(model.output_names, ctx.output_names)  # a step may have removed some

        def outputs() -> Outputs:
            return ctx.predict(lambda batch: tflite_predict_batch(model, batch, ctx.output_names))

    runs = ctx.spec.latency_runs
    evaluation = Evaluation(
        model_bytes=model_bytes or b"",
        x=None if ev_data is None else ctx.inputs_of(ev_data),
        labels=None if ev_data is None else ev_data.labels(output_names),
        predict=(lambda x: outputs()) if outputs is not None else None,
        latencies=lambda: latencies_ms(model_bytes, ctx.sample_inputs(), runs),
        reference=ctx.reference_outputs if ev_data is not None else None,
        latency_runs=runs,
        output_names=output_names,
    )
    out: dict[str, float] = {}
    for name in names:
        provided, output = host.metric_for(name)
        metric = provided.cls()
        if metric.uses == "flatbuffer" and model_bytes is None:
            continue
        if flex and metric.runs_model:
            raise InputError(
                f"metric `{name}` needs to run the model, but it contains TF Select ops ({', '.join(flex)}) "
                "that the LiteRT interpreter cannot run",
                hint="measure only what needs no interpreter (`evaluation: {metrics: [size_bytes], per_step: []}`) "
                "and gate on that, or replace the ops",
            )
        if ev_data is not None and ev_data.memory_mapped and metric.uses == "predictions" and not metric.accumulates():
            _check_fits(name, provided.distribution, evaluation)
        try:
            out.update(_values(output_names, metric, evaluation, output, name))
        except StageError:
            raise
        except ValueError as exc:
            raise PluginError(f"metric `{name}` (distribution `{provided.distribution}`) failed: {exc}") from exc
        except Exception as exc:
            raise PluginError(
                f"metric `{name}` (distribution `{provided.distribution}`) failed: {type(exc).__name__}: {exc}"
            ) from exc
    return out


MEMORY_ENV = "PIPELINE_STAGE_MEMORY_BYTES"  # the memory the stage may count on, where the machine's figure misleads


def memory_available_bytes() -> int:
    """The memory this process may still use: $PIPELINE_STAGE_MEMORY_BYTES when set, else the
    smaller of the cgroup's room (a Kubernetes pod's limit) and the machine's available memory."""
    import os

    if os.environ.get(MEMORY_ENV):
        return int(os.environ[MEMORY_ENV])
    room = []
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            room.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                room.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    return min(room) if room else 1 << 62


def _check_fits(name: str, distribution: str, evaluation: Evaluation) -> None:
    """A metric that reads whole arrays, on streamed data: refused by name when the outputs and
    labels (and the references, once computed) would take more than half the memory left, rather
    than be killed."""
    held, room = evaluation.held_bytes, memory_available_bytes()
    if held > room // 2:
        raise InputError(
            f"metric `{name}` (distribution `{distribution}`) reads whole arrays, and on this evaluation data the outputs, "
            f"labels and references take {held / 2**20:,.2f} MB, more than half the memory left ({room / 2**20:,.2f} MB)",
            hint="give the metric update(state, chunk) and result(state), which the stage runs a block at a time "
            "(docs/plugins.md), or measure fewer samples: `evaluation: {max_samples: N}`",
        )


def timed_side_by_side(
    host: PluginHost, ctx: EvaluationContext, names: list[str], *, baseline_bytes: bytes, candidate_bytes: bytes
) -> list[TimedComparison]:
    """The timed metrics among `names` (latency), baseline and candidate timed in alternating rounds
    in this process: both values from the same minutes of the same machine, and the spread of their
    difference across rounds, which a gate on them does not count. Empty when nothing is timed or a
    model holds TF Select ops (the interpreter cannot run them)."""
    timed = [n for n in names if host.metric_class(n).timed]
    if not timed or _flex_ops(baseline_bytes) or _flex_ops(candidate_bytes):
        return []  # nothing timed; or TF Select ops, which `measure` refuses with its message
    spec = ctx.spec
    per_round = max(5, spec.latency_runs // spec.latency_rounds)
    samples = alternating_latencies_ms(
        {"baseline": baseline_bytes, "candidate": candidate_bytes}, ctx.sample_inputs(), per_round, spec.latency_rounds
    )

    def value(metric, model_bytes: bytes, latencies) -> float:
        evaluation = Evaluation(
            model_bytes=model_bytes, x=None, labels=None, predict=None, latencies=lambda: latencies, latency_runs=len(latencies)
        )
        return float(metric.compute(evaluation))

    out = []
    for name in timed:
        metric = host.metric_class(name)()
        rounds = {
            who: [value(metric, data, arr) for arr in samples[who]]
            for who, data in (("baseline", baseline_bytes), ("candidate", candidate_bytes))
        }
        pooled = {
            who: value(metric, data, np.concatenate(samples[who]))
            for who, data in (("baseline", baseline_bytes), ("candidate", candidate_bytes))
        }
        differences = [c - b for b, c in zip(rounds["baseline"], rounds["candidate"])]
        out.append(
            TimedComparison(
                metric=name,
                rounds=spec.latency_rounds,
                runs_per_round=per_round,
                baseline=pooled["baseline"],
                candidate=pooled["candidate"],
                baseline_rounds=rounds["baseline"],
                candidate_rounds=rounds["candidate"],
                ratio=pooled["candidate"] / pooled["baseline"] if pooled["baseline"] else None,
                spread=(max(differences) - min(differences)) / 2,
            )
        )
    return out


def _values(output_names: list[str], metric, evaluation: Evaluation, output: str | None, name: str) -> dict[str, float]:
    """One metric's value by name: of one output; or, for a metric on predictions of a model with
    several outputs, each output it applies to (`<name>.<output>`, each computed once) and the worst
    of them under the plain name; or the model's."""
    if output is not None:
        if output not in output_names:
            raise InputError(
                f"metric `{name}`: the model has no output `{output}` (outputs: {', '.join(output_names)})",
                hint="name an output the model has",
            )
        return {name: float(metric.compute(evaluation.for_output(output)))}
    if metric.uses != "predictions" or len(output_names) == 1:
        return {name: float(metric.compute(evaluation))}
    per_output, reasons = {}, []
    for o in output_names:
        try:
            per_output[f"{name}.{o}"] = float(metric.compute(evaluation.for_output(o)))
        except ValueError as exc:  # an output the metric does not apply to (accuracy of a regression head)
            reasons.append(f"{o}: {exc}")
    if not per_output:
        raise ValueError("; ".join(reasons))
    worst = min(per_output.values()) if metric.higher_is_better else max(per_output.values())
    return {name: worst, **per_output}


def _flex_ops(model_bytes: bytes) -> list[str]:
    from pipeline_stage.engine.flatbuffer import read

    return sorted(op.split(":", 1)[1] for op in read(model_bytes).ops if op.startswith("CUSTOM:Flex"))
