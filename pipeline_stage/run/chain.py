"""The chain runner: one source model, its data, and chains run on it, each to a typed result.

It resolves and checks the manifest's data sets, measures models (the metrics plugins registered),
converts the float baseline once, and runs a chain: ``model`` steps on the Keras model, the one
conversion after the last ``convert`` step, ``tflite`` steps on the bytes. It knows phases and
steps, never a particular plugin, and nothing of MLflow runs: what a chain logs goes to a
:class:`RunSink` (the stage's MLflow run, or a search trial's folder). The stage and the search
trials use this public API only.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from pipeline_stage.contract.data import Dataset
from pipeline_stage.contract.errors import InputError, PluginError, StageError
from pipeline_stage.contract.report import ConversionRecord, ObserverContext, StepRecord
from pipeline_stage.contract.steps import ConversionSettings, Phase, Step, StepContext
from pipeline_stage.engine.evaluate import check_input_shape
from pipeline_stage.engine.source_model import SourceModel, outputs_by_name
from pipeline_stage.host.plugin_host import PluginHost
from pipeline_stage.manifest import DATA_SETS, LoadedManifest, local_data_path
from pipeline_stage.mlflow_io.source import is_remote
from pipeline_stage.run.progress import Progress

SOURCE_RUN_PLACEHOLDER = "${source.run_id}"


class RunSink(Protocol):
    """Where a chain's metrics and artifacts go."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, local: Path, artifact_path: str | None = None) -> None: ...


@dataclass(frozen=True)
class Baseline:
    """The unoptimized model, measured: the source model for prediction metrics, its float
    conversion for flatbuffer metrics (and every metric of the float .tflite on its own)."""

    float_bytes: bytes
    metrics: dict[str, float]
    tflite_metrics: dict[str, float]
    flatbuffer: dict[str, Any]
    seconds: float


@dataclass(frozen=True)
class ChainResult:
    """One chain, run: the final .tflite, a record per step, the conversion, and the tags its steps
    asked to put on the registered version."""

    model_bytes: bytes
    records: list[StepRecord]
    conversion: ConversionRecord | None
    tags: dict[str, str]


class ChainRunner:
    """Runs chains of `loaded`'s steps on one loaded source model (see the module docstring)."""

    def __init__(
        self,
        loaded: LoadedManifest,
        host: PluginHost,
        source: SourceModel,
        workdir: Path,
        *,
        progress: Progress,
        context: ObserverContext,
    ):
        self.loaded, self.m, self.host, self.source = loaded, loaded.manifest, host, source
        self.workdir, self.progress, self.context = workdir, progress, context
        self._data: dict[str, Dataset] = {}
        self._reference: dict[str, np.ndarray] | None = None

    # -- data -------------------------------------------------------------------------------
    def data_uri(self, name: str) -> str:
        """The manifest's URI for a data set, ${source.run_id} filled in, relative paths resolved."""
        uri = getattr(self.m.data, name)
        if SOURCE_RUN_PLACEHOLDER in uri:
            run_id = self.source.info.run_id
            if not run_id:
                raise InputError(
                    f"`data.{name}` uses {SOURCE_RUN_PLACEHOLDER} but the source model `{self.m.model}` has no run",
                    hint="give the data's full URI",
                )
            uri = uri.replace(SOURCE_RUN_PLACEHOLDER, run_id)
        local = local_data_path(uri, self.loaded.path)
        return str(local) if local is not None else uri

    def load_data(self, name: str) -> Dataset:
        """A data set of the manifest, loaded once, checked against the model's input."""
        if name in self._data:
            return self._data[name]
        if name not in DATA_SETS or getattr(self.m.data, name) is None:
            raise InputError(
                f"`data.{name}` is needed but not given in {self.loaded.path}", hint=f"add `data: {{{name}: <URI>}}`"
            )
        uri = self.data_uri(name)
        local = Path(uri)
        if is_remote(uri):
            from pipeline_stage.mlflow_io.source import download_data

            local = download_data(uri, self.workdir / "data" / name, f"data.{name}")
        elif not local.exists():
            raise InputError(f"`data.{name}`: file `{uri}` does not exist", hint="check the path in the manifest")
        provided = self.host.loader_for(local.suffix)
        if provided is None:
            known = sorted(s for p in self.host.loaders.values() for s in p.cls.suffixes)
            raise InputError(
                f"`data.{name}`: no data loader reads `{local.suffix or local.name}` files (known: {', '.join(known)})",
                hint="convert the data to .npz with arrays x and y, or install a plugin with a loader",
            )
        dataset = provided.cls().load(local, source=f"data.{name}")
        dataset.check(needs_labels=name == "training")
        if name == "evaluation" and not dataset.has_labels:
            needing = self.loaded.needing_labels(self.host)
            if needing:
                raise InputError(
                    f"data `data.evaluation` has no labels `y`, but {', '.join(f'`{n}`' for n in needing)} need them",
                    hint="add an array `y` to the data, or gate without labels, e.g. `- {metric: fidelity_sqnr_db, min: 20}`",
                )
        shapes = self.source.input_shapes
        for input_name, array in dataset.inputs(list(shapes)).items():
            where = f"data.{name}" if len(shapes) == 1 else f"data.{name}` input `{input_name}"
            check_input_shape(where, array, shapes[input_name])
        if name == "evaluation" and self.m.evaluation.max_samples:
            dataset = dataset.take(self.m.evaluation.max_samples)
        self._data[name] = dataset
        return dataset

    def _not_keras(self, step: Step) -> InputError:
        what = "a .tflite file" if self.source.kind == "tflite" else "a SavedModel"
        return InputError(
            f"step `{step.name}` works on Keras models, but `{self.m.model}` is {what}",
            hint="drop the step, or give the Keras model (mlflow.tensorflow.log_model) it came from",
        )

    def check_chain(self, steps: list[Step]) -> None:
        """Refuse, before any work, a chain whose `model` steps the source cannot take."""
        if self.source.keras_model is None:
            for step in steps:
                if step.phase is Phase.MODEL:
                    raise self._not_keras(step)

    def load_all_data(self) -> None:
        """Load every data set the chain, the metrics or the manifest name: bad data fails here,
        before any conversion work."""
        given = {n for n in DATA_SETS if getattr(self.m.data, n)}
        for name in sorted(self.loaded.required_data(self.host) | given):
            self.load_data(name)

    @property
    def datasets(self) -> Mapping[str, Dataset]:
        return dict(self._data)

    @property
    def evaluation_data(self) -> Dataset | None:
        return self.load_data("evaluation") if self.m.data.evaluation else None

    @property
    def metric_names(self) -> list[str]:
        """The metrics measured for baseline and candidate (accuracy by default only when the
        evaluation data has labels)."""
        ev = self.evaluation_data
        return self.loaded.metric_names(labels=ev is not None and ev.has_labels)

    @property
    def output_names(self) -> list[str]:
        return self.source.output_names

    def inputs_of(self, dataset: Dataset):
        """A data set's arrays for the model's inputs: one array for a single-input model, else by name."""
        names = self.source.input_names
        arrays = dataset.inputs(names)
        return arrays[names[0]] if len(names) == 1 else arrays

    def sample_inputs(self):
        """Real inputs to time and probe a model with: the evaluation data, else the calibration or
        training data (never zeros or random arrays, which a quantized model may not survive)."""
        for name in ("evaluation", "calibration", "training"):
            if getattr(self.m.data, name):
                return self.inputs_of(self.load_data(name))
        raise InputError(
            "measuring the model needs real inputs, but the manifest gives no data",
            hint="add `data: {evaluation: <URI>}` (or calibration data)",
        )

    def reference_outputs(self) -> dict[str, np.ndarray]:
        """The source model's outputs on the evaluation data by output name, computed once: the
        baseline that fidelity metrics compare every candidate (and every search trial) with."""
        if self._reference is None:
            ev = self.load_data("evaluation")
            self._reference = self.source.predict_outputs(self.inputs_of(ev), batch_size=self.m.evaluation.batch_size)
        return self._reference

    def use_reference(self, outputs: dict[str, np.ndarray]) -> None:
        """Take the baseline's outputs computed elsewhere (a search trial gets its parent's)."""
        self._reference = {k: np.asarray(v) for k, v in outputs.items()}

    # -- measuring --------------------------------------------------------------------------
    def higher_is_better(self, names: list[str]) -> dict[str, bool]:
        return {n: self.host.metric_class(n).higher_is_better for n in names}

    def prediction_metrics(self, names: list[str]) -> list[str]:
        return [n for n in names if self.host.metric_class(n).uses == "predictions"]

    def measure(self, names: list[str], *, model_bytes: bytes | None, predict: Callable | None = None) -> dict[str, float]:
        """Compute metrics for one model: predictions from `predict` (outputs by name) when given,
        else from the .tflite (see :func:`pipeline_stage.run.measuring.measure`)."""
        from pipeline_stage.run.measuring import measure

        return measure(self, names, model_bytes=model_bytes, predict=predict)

    def baseline(self) -> Baseline:
        """Convert the source model to float once and measure it, and the source model itself."""
        from pipeline_stage.engine.flatbuffer import read as read_flatbuffer

        t0 = time.perf_counter()
        ev = self.evaluation_data
        self.progress("baseline")(
            "float conversion, then " + (f"evaluation on {len(ev)} samples" if ev is not None else "measurements")
        )
        float_bytes = self.convert(self._settings(), self.source.keras_model, log_name="convert-baseline.log")
        tflite_metrics = self.measure(self.metric_names, model_bytes=float_bytes)
        metrics = dict(tflite_metrics)
        metrics.update(
            self.measure(
                self.prediction_metrics(self.metric_names),
                model_bytes=None,
                predict=lambda x: self.reference_outputs(),  # the source model's outputs on the evaluation data
            )
        )
        return Baseline(
            float_bytes, metrics, tflite_metrics, read_flatbuffer(float_bytes).summary(), round(time.perf_counter() - t0, 3)
        )

    # -- the chain --------------------------------------------------------------------------
    def _settings(self) -> ConversionSettings:
        return ConversionSettings(
            allow_select_tf_ops=self.m.conversion.allow_select_tf_ops, allow_custom_ops=self.m.conversion.allow_custom_ops
        )

    def convert(self, settings: ConversionSettings, keras_model: Any, *, log_name: str = "convert.log") -> bytes:
        """The one conversion of a chain (or the baseline's), with the data its settings name."""
        from pipeline_stage.engine.convert import convert

        representative = self.load_data(settings.representative_data) if settings.representative_data else None
        training = self.load_data(settings.training_data) if settings.training_data else None
        if representative is not None:
            self.progress("convert")(
                f"{settings.quantization} ({settings.engine}): calibrating on "
                f"{min(len(representative), settings.calibration_samples)} samples"
            )
        return convert(
            self.source,
            settings,
            keras_model=keras_model,
            representative=representative,
            training=training,
            log_path=self.workdir / log_name,
            log=self.progress("convert"),
        )

    def _apply(self, step: Step, index: int, subject: Any, ctx: StepContext) -> Any:
        try:
            return step.apply(subject, ctx)
        except StageError:
            raise
        except Exception as exc:
            dist = self.host.steps[step.name].distribution
            raise PluginError(
                f"step {index + 1} `{step.name}` (distribution `{dist}`) failed: {type(exc).__name__}: {exc}"
            ) from exc

    def run_chain(self, steps: list[Step], sink: RunSink, *, float_bytes: bytes | None = None) -> ChainResult:
        """Run one chain on the source model: model steps, the one conversion, tflite steps.

        `float_bytes` (the baseline's float conversion) is reused when the chain asks nothing of the
        conversion.
        """
        from pipeline_stage.engine.flatbuffer import read as read_flatbuffer

        m, src, hook = self.m, self.source, self.host.hook
        per_step = list(m.evaluation.per_step)
        settings = self._settings()
        records: list[StepRecord] = []
        tags: dict[str, str] = {}
        keras_model = src.keras_model
        model_bytes: bytes | None = None
        conversion: ConversionRecord | None = None
        last_convert = max((i for i, s in enumerate(steps) if s.phase is Phase.CONVERT), default=None)

        def do_convert() -> bytes:
            nonlocal conversion
            t = time.perf_counter()
            transformed = any(s.phase is Phase.MODEL for s in steps)
            if float_bytes is not None and not transformed and settings.quantization is None and not settings.set_by:
                out = float_bytes  # nothing asked of the conversion: the baseline's is the same one
            else:
                out = self.convert(settings, keras_model)
                sink.log_artifact(self.workdir / "convert.log")
            conversion = ConversionRecord(
                settings={k: v for k, v in dataclasses.asdict(settings).items() if k != "set_by"},
                seconds=round(time.perf_counter() - t, 3),
                flatbuffer=read_flatbuffer(out).summary(),
            )
            return out

        for i, step in enumerate(steps):
            if step.phase is Phase.TFLITE and model_bytes is None:
                model_bytes = do_convert()
            hook.before_step(step=step, index=i, context=self.context)
            ctx = StepContext(
                workdir=self.workdir,
                load_data=self.load_data,
                samples=self.sample_inputs,
                log=self.progress(step.name),
                model=keras_model,
                conversion=settings,
            )
            t = time.perf_counter()
            if step.phase is Phase.MODEL:
                if keras_model is None:
                    raise self._not_keras(step)
                keras_model = self._apply(step, i, keras_model, ctx)
                model_now = keras_model
                metrics = self.measure(
                    self.prediction_metrics(per_step),
                    model_bytes=None,
                    predict=lambda x: outputs_by_name(
                        model_now.predict(x, batch_size=m.evaluation.batch_size, verbose=0), self.output_names
                    ),
                )
            elif step.phase is Phase.CONVERT:
                self._apply(step, i, settings, ctx)
                metrics = {}
                if i == last_convert:
                    model_bytes = do_convert()
                    metrics = self.measure(per_step, model_bytes=model_bytes)
            else:
                model_bytes = self._apply(step, i, model_bytes, ctx)
                if not isinstance(model_bytes, (bytes, bytearray)):
                    raise PluginError(f"step `{step.name}` returned {type(model_bytes).__name__}, expected the .tflite bytes")
                model_bytes = bytes(model_bytes)
                metrics = self.measure(per_step, model_bytes=model_bytes)
            record = StepRecord(
                name=step.name,
                phase=step.phase.value,
                params=step.params.model_dump(mode="json"),
                metrics=metrics,
                seconds=round(time.perf_counter() - t, 3),
                notes=ctx.notes,
            )
            records.append(record)
            tags.update(ctx.tags)
            for path in ctx.artifacts.values():
                sink.log_artifact(Path(path), f"steps/{i}-{step.name}")
            sink.log_metrics({f"step.{i}.{step.name}.{k}": v for k, v in metrics.items()})
            hook.after_step(step=step, record=record, context=self.context)
        if model_bytes is None:
            model_bytes = do_convert()
        return ChainResult(model_bytes, records, conversion, tags)
