"""Every hook of pipeline-stage, in one module.

A plugin is a module (or an object) with functions marked ``@hookimpl``; it reaches the stage
through the entry-point group ``pipeline_stage``::

    [project.entry-points.pipeline_stage]
    my_plugin = "pipeline_stage_my_plugin.hooks"

Two kinds of hook:

* registration hooks (``register_steps``, ``register_metrics``, ``register_data_loaders``,
  ``register_keras_objects``) receive
  a ``register`` callback and call it once per class they provide. The host validates every
  registration (a name, the right base class, no duplicate) and remembers which distribution
  supplied it. They run at plugin-manager start-up and must not import TensorFlow.
* observer hooks (``before_step``, ``after_step``, ``after_gates``, ``after_register``,
  ``on_stage_error``) are called by the runner; they watch a run (progress, logging,
  notifications) and return nothing. They must not change the objects they receive.

pluggy's opt-in arguments apply: an implementation may accept fewer arguments than the spec, so
specs only ever gain arguments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:  # imports for annotations only: hookspecs must stay light
    from pipeline_stage.steps import Step, StepRecord
    from pipeline_stage.runner import RunContext

PROJECT = "pipeline_stage"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_steps(register: Callable[[type], None]) -> None:
    """Register optimization step classes.

    :param register: call ``register(StepClass)`` for each :class:`pipeline_stage.steps.Step`
        subclass this plugin provides. The class sets ``name`` (unique across all plugins; what a
        manifest's ``chain`` uses), ``phase`` (``model``, ``convert`` or ``tflite``), a pydantic
        ``Params`` model (typed fields with defaults and descriptions) and ``apply()``.
    :return: nothing; results are collected through ``register``.
    """


@hookspec
def register_metrics(register: Callable[[type], None]) -> None:
    """Register evaluation metric classes.

    :param register: call ``register(MetricClass)`` for each :class:`pipeline_stage.metrics.Metric`
        subclass. A metric has a unique ``name`` (what gates and ``evaluation.metrics`` use),
        ``higher_is_better`` and ``compute(evaluation) -> float``.
    :return: nothing; results are collected through ``register``.
    """


@hookspec
def register_data_loaders(register: Callable[[type], None]) -> None:
    """Register data formats.

    :param register: call ``register(LoaderClass)`` for each
        :class:`pipeline_stage.data.DataLoader` subclass. A loader has a unique ``name``, the file
        ``suffixes`` it reads (``(".npz",)``) and ``load(path) -> Dataset``.
    :return: nothing; results are collected through ``register``.
    """


@hookspec
def register_keras_objects(register: Callable[[str, Any], None]) -> None:
    """Make custom Keras layers, losses or functions known when the source model is loaded.

    :param register: call ``register(name, obj)`` for each object, under the name the model's
        config uses (``"package>ClassName"`` for ``@keras.saving.register_keras_serializable``
        classes, or the plain class name). Passed to ``keras.saving.load_model(custom_objects=...)``.
    :return: nothing; results are collected through ``register``.
    """


@hookspec
def before_step(step: "Step", index: int, context: "RunContext") -> None:
    """Called before a chain step runs.

    :param step: the configured step instance (its ``params`` are validated).
    :param index: the step's position in the chain, from 0.
    :param context: the run's context (manifest, work directory, MLflow run id).
    """


@hookspec
def after_step(step: "Step", record: "StepRecord", context: "RunContext") -> None:
    """Called after a chain step ran, with what was measured after it.

    :param step: the configured step instance.
    :param record: name, phase, params, metrics after the step, seconds, and the step's notes.
    :param context: the run's context.
    """


@hookspec
def after_gates(results: list[dict[str, Any]], passed: bool, context: "RunContext") -> None:
    """Called once the gates were evaluated, before anything is registered.

    :param results: one dict per gate: ``metric``, ``rule``, ``threshold``, ``value``,
        ``baseline``, ``passed``.
    :param passed: whether every gate passed.
    :param context: the run's context.
    """


@hookspec
def after_register(registered: dict[str, Any], context: "RunContext") -> None:
    """Called after a model version was registered (and its alias set, when it was).

    :param registered: ``name``, ``version``, ``alias`` (or None), ``uri`` (``models:/name/N``).
    :param context: the run's context.
    """


@hookspec
def on_stage_error(error: BaseException, context: "RunContext") -> None:
    """Called when the stage fails, before the MLflow run is marked FAILED.

    :param error: the exception that ends the run.
    :param context: the run's context.
    """
