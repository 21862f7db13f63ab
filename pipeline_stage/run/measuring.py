"""Measuring one model: the metrics plugins registered, on its outputs by name.

A model with several outputs gets every metric computed on predictions per output
(`<metric>.<output>`), and the plain name is the worst output's value, so a gate on
`fidelity_sqnr_db` sees the most damaged output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from pipeline_stage.contract.errors import InputError, PluginError, StageError
from pipeline_stage.contract.metrics import Evaluation
from pipeline_stage.contract.report import TimedComparison
from pipeline_stage.engine.evaluate import alternating_latencies_ms, default_threads, latencies_ms
from pipeline_stage.engine.source_model import aligned_names, outputs_by_name

if TYPE_CHECKING:
    from pipeline_stage.run.chain import ChainRunner


def measure(
    runner: "ChainRunner", names: list[str], *, model_bytes: bytes | None, predict: Callable | None = None
) -> dict[str, float]:
    """Compute metrics for one model: predictions from `predict` (outputs by name) when given,
    else from the .tflite. A model with several outputs also gets `<metric>.<output>` for every
    metric computed on predictions, and the plain name is the worst output's value."""
    host, ev_data = runner.host, runner.evaluation_data
    output_names = runner.output_names
    flex = _flex_ops(model_bytes) if model_bytes is not None and predict is None else []
    on_predictions = any(host.metric_class(n).uses == "predictions" for n in names)
    if predict is None and on_predictions and not flex:
        from pipeline_stage.engine.litert_runtime import TFLiteModel

        model = TFLiteModel(model_bytes, threads=runner.m.evaluation.threads or default_threads())
        output_names = aligned_names(model.output_names, runner.output_names)  # a step may have removed some
        batch = runner.m.evaluation.batch_size

        def predict(x):
            feed = {k: v.astype(np.float32) for k, v in x.items()} if isinstance(x, dict) else x.astype(np.float32)
            return outputs_by_name(model.predict_outputs(feed, batch_size=batch), runner.output_names)

    runs = runner.m.evaluation.latency_runs
    evaluation = Evaluation(
        model_bytes=model_bytes or b"",
        x=None if ev_data is None else runner.inputs_of(ev_data),
        labels=None if ev_data is None else ev_data.labels(output_names),
        predict=predict,
        latencies=lambda: latencies_ms(model_bytes, runner.sample_inputs(), runs),
        reference=runner.reference_outputs if ev_data is not None else None,
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


def timed_side_by_side(
    runner: "ChainRunner", names: list[str], *, baseline_bytes: bytes, candidate_bytes: bytes
) -> list[TimedComparison]:
    """The timed metrics among `names` (latency), baseline and candidate timed in alternating rounds
    in this process: both values from the same minutes of the same machine, and the spread of their
    difference across rounds, which a gate on them does not count. Empty when nothing is timed or a
    model holds TF Select ops (the interpreter cannot run them)."""
    timed = [n for n in names if runner.host.metric_class(n).timed]
    if not timed or _flex_ops(baseline_bytes) or _flex_ops(candidate_bytes):
        return []  # nothing timed; or TF Select ops, which `measure` refuses with its message
    spec = runner.m.evaluation
    per_round = max(5, spec.latency_runs // spec.latency_rounds)
    samples = alternating_latencies_ms(
        {"baseline": baseline_bytes, "candidate": candidate_bytes}, runner.sample_inputs(), per_round, spec.latency_rounds
    )

    def value(metric, model_bytes: bytes, latencies) -> float:
        evaluation = Evaluation(
            model_bytes=model_bytes, x=None, labels=None, predict=None, latencies=lambda: latencies, latency_runs=len(latencies)
        )
        return float(metric.compute(evaluation))

    out = []
    for name in timed:
        metric = runner.host.metric_class(name)()
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


def measure_beside_baseline(
    runner: "ChainRunner", names: list[str], *, baseline_bytes: bytes, candidate_bytes: bytes
) -> tuple[dict[str, float], list[TimedComparison]]:
    """The candidate's metrics among `names`: the timed ones (latency) timed beside the baseline in
    alternating rounds (:func:`timed_side_by_side`, also returned), the others as :func:`measure`."""
    timed = timed_side_by_side(runner, names, baseline_bytes=baseline_bytes, candidate_bytes=candidate_bytes)
    done = {t.metric for t in timed}
    values = measure(runner, [n for n in names if n not in done], model_bytes=candidate_bytes)
    values.update({t.metric: t.candidate for t in timed})
    return values, timed


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
