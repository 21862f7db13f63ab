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
from pipeline_stage.engine.evaluate import default_threads, latencies_ms
from pipeline_stage.engine.source_model import outputs_by_name

if TYPE_CHECKING:
    from pipeline_stage.run.chain import ChainRunner


def measure(
    runner: "ChainRunner", names: list[str], *, model_bytes: bytes | None, predict: Callable | None = None
) -> dict[str, float]:
    """Compute metrics for one model: predictions from `predict` (outputs by name) when given,
    else from the .tflite. A model with several outputs also gets `<metric>.<output>` for every
    metric computed on predictions, and the plain name is the worst output's value."""
    ev_data = runner.evaluation_data
    threads = runner.m.evaluation.threads or default_threads()
    batch = runner.m.evaluation.batch_size
    flex = _flex_ops(model_bytes) if model_bytes is not None and predict is None else []
    output_names = runner.output_names
    if predict is None:
        from pipeline_stage.engine.litert_runtime import TFLiteModel

        model = TFLiteModel(model_bytes, threads=threads)
        # the .tflite's outputs, named as the source model's (a step may have removed some)
        output_names = list(outputs_by_name({n: np.zeros(0) for n in model.output_names}, runner.output_names))

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
    several = len(output_names) > 1
    wanted = list(names)
    if several:  # which output is worst is what a report on a multi-output model must show
        for name in names:
            if runner.host.metric_for(name)[1] is None and runner.host.metric_class(name).uses == "predictions":
                wanted += [f"{name}.{o}" for o in output_names if f"{name}.{o}" not in wanted]
    out: dict[str, float] = {}
    for name in wanted:
        provided, output = runner.host.metric_for(name)
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
            value = _value(output_names, metric, evaluation, output, name)
        except StageError:
            raise
        except ValueError as exc:
            if name not in names:  # an automatic per-output value that does not apply to this output
                continue
            raise PluginError(f"metric `{name}` (distribution `{provided.distribution}`) failed: {exc}") from exc
        except Exception as exc:
            raise PluginError(
                f"metric `{name}` (distribution `{provided.distribution}`) failed: {type(exc).__name__}: {exc}"
            ) from exc
        if value is not None:
            out[name] = value
    return out


def _value(output_names: list[str], metric, evaluation: Evaluation, output: str | None, name: str) -> float | None:
    """One metric's value: of one output, the worst of every output it applies to, or the model's."""
    if output is not None:
        if output not in output_names:
            raise InputError(
                f"metric `{name}`: the model has no output `{output}` (outputs: {', '.join(output_names)})",
                hint="name an output the model has",
            )
        return float(metric.compute(evaluation.for_output(output)))
    if metric.uses != "predictions" or len(output_names) == 1:
        return float(metric.compute(evaluation))
    values, reasons = [], []
    for o in output_names:
        try:
            values.append(float(metric.compute(evaluation.for_output(o))))
        except ValueError as exc:
            reasons.append(f"{o}: {exc}")
    if not values:
        raise ValueError("; ".join(reasons))
    return min(values) if metric.higher_is_better else max(values)


def _flex_ops(model_bytes: bytes) -> list[str]:
    from pipeline_stage.engine.flatbuffer import read

    return sorted(op.split(":", 1)[1] for op in read(model_bytes).ops if op.startswith("CUSTOM:Flex"))
