"""Every hook of pipeline-stage, in one module.

A plugin is a module (or an object) with functions marked ``@hookimpl``; it reaches the stage
through the entry-point group ``pipeline_stage``::

    [project.entry-points.pipeline_stage]
    my_plugin = "pipeline_stage_my_plugin.hooks"

Two kinds of hook:

* registration hooks (``register_sources``, ``register_quantization_engines``, ``register_compilers``,
  ``register_steps``, ``register_metrics``, ``register_data_loaders``, ``register_search_moves``,
  ``register_keras_objects``) receive a ``register`` callback and call
  it once per thing they provide. The host validates every registration (a name, the right base
  class, no duplicate) and remembers which distribution supplied it; an exception raised in one
  stops the stage with exit code 2 naming the distribution. They run at plugin-manager start-up
  and must not import TensorFlow.
* observer hooks (``before_step``, ``after_step``, ``after_gates``, ``after_register``,
  ``on_stage_error``) are called by the stage; they watch a run (progress, logging,
  notifications) and return nothing. What they receive is read-only: frozen records of the
  typed report (:mod:`pipeline_stage.contract.report`) and an ``ObserverContext``.

pluggy's opt-in arguments apply: an implementation may accept fewer arguments than the spec, so
specs only ever gain arguments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:  # imports for annotations only: hookspecs must stay light
    from pipeline_stage.contract.report import GateResult, ObserverContext, Registered, StepRecord
    from pipeline_stage.contract.steps import Step

PROJECT = "pipeline_stage"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_sources(register: Callable[[type], None]) -> None:
    """Register model kinds the stage can read (Keras, SavedModel, .tflite are built-in ones).

    :param register: call ``register(SourceClass)`` for each
        :class:`pipeline_stage.contract.sources.ModelSource` subclass. The class sets ``name`` (the
        kind: unique; what steps' ``check_source`` and engines' ``source_kinds`` name), ``title``
        (the kind in words), ``flavors`` (MLflow flavors whose models it may hold: the stage asks
        these sources first for a model whose MLmodel file names one), ``suffixes`` (file suffixes
        that show the kind from a URI), and implements ``locate(root)`` (the file or folder of this
        kind under a downloaded model, or None), ``open(path, info, options)`` (load it, safely),
        ``input_names`` / ``output_names`` / ``input_shapes``, ``predict_batch(inputs, model=None)``
        (the framework's own outputs: the baseline's reference) and ``to_float_tflite(conversion,
        model, log_path)``. Sources are asked in registration order (built-ins first); a model no
        source recognises stops the stage with exit code 2 naming the flavors found and the
        installed sources.
    :return: nothing; results are collected through ``register``.
    """


@hookspec
def register_quantization_engines(register: Callable[[type], None]) -> None:
    """Register quantization engines (the TFLite converter and the LiteRT Quantizer are built-in ones).

    :param register: call ``register(EngineClass)`` for each
        :class:`pipeline_stage.contract.engines.QuantizationEngine` subclass. The class sets
        ``name`` (unique; what ``quantize: {engine: <name>}`` names), ``modes`` (the ``quantize``
        modes it offers), ``source_kinds`` (the source kinds it takes; empty: any, working on the
        float .tflite), optionally ``Params`` (its options, from ``quantize: {options: {...}}``),
        and implements ``quantize(job) -> bytes`` and optionally ``per_layer_errors(job,
        quantized, data, samples)``.
    :return: nothing; results are collected through ``register``.
    """


@hookspec
def register_compilers(register: Callable[[type], None]) -> None:
    """Register accelerator compilers (LiteRT's vendor compiler plugins are built-in ones).

    :param register: call ``register(CompilerClass)`` for each
        :class:`pipeline_stage.contract.compilers.AcceleratorCompiler` subclass. The class sets
        ``name`` (unique; what ``compile: {targets: [<name>/<soc>]}`` names), ``socs`` (the SoC
        models it compiles for), ``sdk`` and ``install_hint`` (what it needs and how an image gets
        it), optionally ``Params`` (per-target options), and implements ``unavailable(soc,
        options)``, ``partition(model_bytes, soc)``, ``compile(model_bytes, soc, options)`` and,
        where this machine can run what it compiles, ``runner(compiled, soc, options)``.
    :return: nothing; results are collected through ``register``.
    """


@hookspec
def register_steps(register: Callable[[type], None]) -> None:
    """Register optimization step classes.

    :param register: call ``register(StepClass)`` for each :class:`pipeline_stage.contract.steps.Step`
        subclass this plugin provides. The class sets ``name`` (unique across all plugins; what a
        manifest's ``chain`` uses), ``phase`` (``model``, ``convert`` or ``tflite``), a pydantic
        ``Params`` model (typed fields with defaults and descriptions) and ``apply()``.
    :return: nothing; results are collected through ``register``.
    """


@hookspec
def register_metrics(register: Callable[[type], None]) -> None:
    """Register evaluation metric classes.

    :param register: call ``register(MetricClass)`` for each :class:`pipeline_stage.contract.metrics.Metric`
        subclass. A metric has a unique ``name`` (what gates and ``evaluation.metrics`` use),
        ``higher_is_better`` (the direction of a gate's "drop"), ``needs_labels`` (it reads the
        evaluation data's ``y``; the manifest must then give evaluation data), ``runs_model`` (it
        invokes the model; False for size-like metrics), ``uses`` (``predictions``: computable on
        the Keras model too, so also after ``model``-phase steps; ``flatbuffer``: needs the
        .tflite), and ``compute(evaluation) -> float`` (raise ``ValueError`` for an output the metric
        does not apply to), or instead ``update(state, chunk)`` and ``result(state) -> float``,
        which the stage runs over the evaluation data a block of samples at a time (any size of
        data; a ``compute``-only metric reads whole arrays and is refused, exit 2, where those
        would not fit in memory). Metrics on predictions are also computed per model output, as
        ``<metric>.<output>``; on a multi-output model the plain name is the worst output.
    :return: nothing; results are collected through ``register``.
    """


@hookspec
def register_data_loaders(register: Callable[[type], None]) -> None:
    """Register data formats.

    :param register: call ``register(LoaderClass)`` for each
        :class:`pipeline_stage.contract.data.DataLoader` subclass. A loader has a unique ``name``, the file
        ``suffixes`` it reads (``(".npz",)``) and ``load(path, source) -> Dataset`` (``source``
        names the data set in messages, e.g. ``data.evaluation``). A format bigger than memory
        sets ``streams = True`` and implements ``batches(path, source, batch_size)``, yielding
        arrays by name a batch at a time: the stage writes them to memory-mapped files as they
        come (so does it with every shard of a glob, through ``batches``, whose default reads
        ``load``).
    :return: nothing; results are collected through ``register``.
    """


@hookspec
def register_search_moves(register: Callable[[type], None]) -> None:
    """Register the ways the ``auto`` search may change a chain that uses your steps.

    :param register: call ``register(MoveClass)`` for each
        :class:`pipeline_stage.contract.moves.SearchMove` subclass. A move has a unique ``name``
        (what ``search.moves`` lists), a ``kind`` (``alternative``: chains tried side by side in
        the first round; ``refine``: one more option per round from the closest trial), a
        ``cost`` (per proposed chain, 1.0 = one conversion; cheaper moves go first), and
        ``applies(chain)``; the module :mod:`pipeline_stage.contract.moves` documents the rest.
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
def register_op_resolvers(register: Callable[..., None]) -> None:
    """Give the LiteRT interpreter the kernels of custom ops that models use.

    :param register: call ``register(registerer, ops=[...])`` once per registerer. `registerer` is
        ``"module:function"``, a function (a pybind one, as LiteRT's own) that takes the address
        of the interpreter's op resolver and adds kernels to it, or the name of such a C function
        already loaded in the process; `ops` are the custom op names it provides (for messages:
        a model using a custom op no plugin provides is refused with exit code 2 naming the op).
        Every interpreter the stage, its search trials and the registered model's pyfunc create
        uses every registered registerer (the pyfunc records them: the serving environment needs
        the module too).
    :return: nothing; results are collected through ``register``.
    """


@hookspec
def before_step(step: "Step", index: int, context: "ObserverContext") -> None:
    """Called before a chain step runs.

    :param step: the configured step instance (its ``params`` are validated).
    :param index: the step's position in the chain, from 0.
    :param context: what observers see of the run: ``manifest_path``, ``chain_digest``,
        ``steps`` (the chain), ``run_id`` (the MLflow run; None in a search trial), ``quiet``.
    """


@hookspec
def after_step(step: "Step", record: "StepRecord", context: "ObserverContext") -> None:
    """Called after a chain step ran, with what was measured after it.

    :param step: the configured step instance.
    :param record: a frozen :class:`~pipeline_stage.contract.report.StepRecord`: name, phase,
        params, metrics after the step, seconds, and the step's notes.
    :param context: the run's context.
    """


@hookspec
def after_gates(results: list["GateResult"], passed: bool, context: "ObserverContext") -> None:
    """Called once the gates were evaluated, before anything is registered.

    :param results: one frozen :class:`~pipeline_stage.contract.report.GateResult` per gate:
        ``metric``, ``rule``, ``threshold``, ``value``, ``baseline``, ``compared``, ``passed``
        (and ``verdict``, ``label``).
    :param passed: whether every gate passed.
    :param context: the run's context.
    """


@hookspec
def after_register(registered: "Registered", context: "ObserverContext") -> None:
    """Called after a model version was registered (and its alias set, when it was).

    :param registered: a frozen :class:`~pipeline_stage.contract.report.Registered`: ``name``,
        ``version``, ``alias`` (or None), ``uri`` (``models:/name/N``), ``reused``.
    :param context: the run's context.
    """


@hookspec
def on_stage_error(error: BaseException, context: "ObserverContext") -> None:
    """Called when the stage fails, before the MLflow run is marked FAILED.

    :param error: the exception that ends the run.
    :param context: the run's context.
    """
