"""The evaluation context: the data a run measures models on, built once per source model.

It owns the data sets (loaded once, checked against the model's inputs), each data set's inputs as
the model takes them, the real inputs models are timed on, and the source model's outputs on the
evaluation data (the reference every fidelity metric compares a candidate with). Every
prediction on the evaluation data goes through :meth:`EvaluationContext.predict`, one loop that
hands the inputs out in batches of ``evaluation.batch_size``.

The stage builds it from its manifest (:meth:`EvaluationContext.for_manifest`); a search trial
from its request, with the data its parent loaded and the parent's reference outputs.
"""

from __future__ import annotations

import glob
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from pipeline_stage.contract.data import Dataset, release_pages
from pipeline_stage.contract.errors import InputError
from pipeline_stage.contract.sources import ModelSource
from pipeline_stage.engine.evaluate import check_input_shape
from pipeline_stage.host.plugin_host import PluginHost
from pipeline_stage.manifest import DATA_SETS, LoadedManifest, local_data_path
from pipeline_stage.manifest.data_checks import DATASET_PREFIX
from pipeline_stage.manifest.schema import DataSource, EvaluationSpec
from pipeline_stage.mlflow_io.source import is_glob, is_remote
from pipeline_stage.run.data_spool import SUFFIX as SPOOL_SUFFIX
from pipeline_stage.run.data_spool import OutputFiles, shard_batches, spool

SOURCE_RUN_PLACEHOLDER = "${source.run_id}"
STREAM_BATCH = 256  # samples read from a streamed file at a time

Inputs = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]


class EvaluationContext:
    """The data sets, inputs and reference outputs of one source model (see the module docstring).

    `data` maps each given data set to its local path or URI (resolved: no placeholder, no relative
    path); `needing_labels` names the measured metrics that need the evaluation data's labels.
    """

    def __init__(
        self,
        host: PluginHost,
        source: ModelSource,
        data: Mapping[str, str],
        spec: EvaluationSpec,
        *,
        workdir: Path,
        needing_labels: list[str] = (),
        log: Callable[[str], None] | None = None,
        options: Mapping[str, DataSource] | None = None,
    ):
        self.host, self.source, self.spec, self.workdir = host, source, spec, workdir
        self.log = log or (lambda _message: None)
        self.data = dict(data)
        # a data set's `format`, `features` and `max_samples` where the manifest gave it as a mapping
        self.options = {k: v for k, v in (options or {}).items() if v is not None and (v.format or v.features or v.max_samples)}
        self.needing_labels = list(needing_labels)
        self._datasets: dict[str, Dataset] = {}
        self._local: dict[str, Path] = {}
        self._reference: Outputs | None = None
        self._predictions = 0  # how many models' outputs went to files (each its own folder)
        self.notes: list[str] = []  # what evaluating had to do otherwise (a batch retried smaller), for the report

    @classmethod
    def for_manifest(
        cls,
        loaded: LoadedManifest,
        host: PluginHost,
        source: ModelSource,
        workdir: Path,
        log: Callable[[str], None] | None = None,
    ) -> "EvaluationContext":
        """The context of a manifest's data, ${source.run_id} filled in and relative paths resolved;
        `log` hears about data read as a stream."""
        data = {name: data_uri(loaded, name, source.info.run_id) for name in DATA_SETS if getattr(loaded.manifest.data, name)}
        return cls(
            host,
            source,
            data,
            loaded.manifest.evaluation,
            workdir=workdir,
            needing_labels=loaded.needing_labels(host),
            log=log,
            options={name: loaded.manifest.data.source(name) for name in data},
        )

    # -- data sets ---------------------------------------------------------------------------
    def load(self, name: str) -> Dataset:
        """A data set, loaded once (downloaded first when it is remote), checked against the model.
        A glob of shards, and a format whose loader streams, is read batch by batch into memory-
        mapped files (:mod:`pipeline_stage.run.data_spool`)."""
        if name in self._datasets:
            return self._datasets[name]
        if name not in self.data:
            raise InputError(f"`data.{name}` is needed but not given in the manifest", hint=f"add `data: {{{name}: <URI>}}`")
        dataset, local = self._read(name, self.data[name])
        dataset.check(needs_labels=name == "training")
        if name == "evaluation" and not dataset.has_labels and self.needing_labels:
            raise InputError(
                f"data `data.evaluation` has no labels `y`, but {', '.join(f'`{n}`' for n in self.needing_labels)} need them",
                hint="add an array `y` to the data, or gate without labels, e.g. `- {metric: fidelity_sqnr_db, min: 20}`",
            )
        shapes = self.source.input_shapes
        for input_name, array in dataset.inputs(list(shapes)).items():
            where = f"data.{name}" if len(shapes) == 1 else f"data.{name}` input `{input_name}"
            check_input_shape(where, array, shapes[input_name])
        dataset.feed = self.source.feed  # every model is fed the inputs as the converted model takes them
        if name == "evaluation" and self.spec.max_samples:
            dataset = dataset.take(self.spec.max_samples)
        self._datasets[name], self._local[name] = dataset, local
        return dataset

    def _read(self, name: str, uri: str) -> tuple[Dataset, Path]:
        """The data set at `uri` and where it now is on this machine (the file, or the folder it
        was streamed into)."""
        field = f"data.{name}"
        downloads = self.workdir / "data" / name
        if is_glob(uri):
            shards, fetch, discard = self._shards(field, uri, downloads)
        elif is_remote(uri):
            from pipeline_stage.mlflow_io.source import download_data

            # streamed, the download is deleted once read (the memory-mapped files hold the data)
            shards, fetch, discard = [download_data(uri, downloads, field)], Path, True
        else:
            if not Path(uri).exists():
                raise InputError(f"`{field}`: file `{uri}` does not exist", hint="check the path in the manifest")
            shards, fetch, discard = [Path(uri)], Path, False
        options = self.options.get(name)
        loader = self._loader(field, shards, options.format if options else None)
        # Read whole only what a search trial can read back from the same file as it is.
        if len(shards) == 1 and not loader.streams and options is None:
            local = fetch(shards[0])
            return loader.load(local, source=field), local
        folder = self.workdir / "data" / f"{name}{SPOOL_SUFFIX}"
        shapes = self.source.input_shapes
        if len(shapes) == 1:
            shapes = {**shapes, "x": next(iter(shapes.values()))}
        features = dict(options.features) if options else {}

        def read(path: Path) -> Iterator[dict[str, np.ndarray]]:
            for arrays in loader_batches(loader, path, field, STREAM_BATCH, sorted(set(features.values())) or None):
                yield renamed(arrays, features, field, path.name)

        limits = [
            n for n in (options.max_samples if options else None, self.spec.max_samples if name == "evaluation" else None) if n
        ]
        limit = min(limits) if limits else None
        one_at_a_time = " one at a time" if discard and len(shards) > 1 else ""
        self.log(f"{field}: reading {len(shards)} file(s) as a stream ({loader.name}){one_at_a_time}")
        started = time.perf_counter()
        dataset = spool(shard_batches(shards, fetch, read, discard), folder, field, shapes=shapes, limit=limit)
        read_as = f"{len(shards)} file(s) read as a stream, {len(dataset)} samples, memory-mapped"
        self.log(f"{field}: {read_as} in {time.perf_counter() - started:.1f}s")
        self.notes.append(f"`{field}`: {read_as}")
        return dataset, folder

    def _shards(self, field: str, uri: str, downloads: Path) -> tuple[list, Callable, bool]:
        """A glob's shards, sorted by name, and how to get each one's file: local files as they
        are; a remote glob is listed in the artifact store and each shard downloaded in turn,
        deleted once read."""
        if is_remote(uri):
            from pipeline_stage.mlflow_io.source import download_data, list_data_shards

            return list_data_shards(uri, field), lambda shard: download_data(shard, downloads, field), True
        shards = sorted(Path(p) for p in glob.glob(uri))
        if not shards:
            raise InputError(
                f"`{field}`: no file matches `{uri}`", hint="check the pattern (a glob such as `data/eval-*.tfrecord`)"
            )
        return shards, Path, False

    def _loader(self, field: str, shards: list, format: str | None = None):
        if format is not None:
            return self.host.loaders[format].cls()  # the manifest's check made sure it exists
        suffixes = {Path(str(s)).suffix.lower() for s in shards}
        if len(suffixes) > 1:
            raise InputError(
                f"`{field}`: the files matched are of several kinds ({', '.join(sorted(suffixes))})",
                hint="match one kind of file, e.g. `eval-*.tfrecord`",
            )
        suffix = suffixes.pop()
        provided = self.host.loader_for(suffix)
        if provided is None:
            known = sorted(s for p in self.host.loaders.values() for s in p.cls.suffixes)
            name = Path(str(shards[0])).name
            raise InputError(
                f"`{field}`: no data loader reads `{suffix or name}` files (known: {', '.join(known)})",
                hint="convert the data to .npz with arrays x and y, or install a plugin with a loader",
            )
        return provided.cls()

    def load_all(self, names: set[str] = frozenset()) -> None:
        """Load `names` and every given data set: bad data fails here, before any conversion work."""
        for name in sorted(set(names) | set(self.data)):
            self.load(name)

    def lineage(self) -> list[dict[str, Any]]:
        """Each loaded data set as MLflow records a run's input: its role (`evaluation`,
        `calibration`, `training`), the file name, the URI it came from, its content digest, its
        arrays' dtypes and shapes and its sample count."""
        out = []
        for role, dataset in self._datasets.items():
            uri = self.data[role]
            arrays = {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in dataset.arrays.items()}
            samples = len(next(iter(dataset.arrays.values()))) if dataset.arrays else 0
            name = uri.rstrip("/").rsplit("/", 1)[-1] or role
            out.append({"role": role, "name": name, "uri": uri, "digest": dataset.digest(), "arrays": arrays, "samples": samples})
        return out

    def local_paths(self) -> dict[str, str]:
        """Where each loaded data set is on this machine (a search trial reads them from there)."""
        return {name: str(path) for name, path in sorted(self._local.items())}

    @property
    def evaluation(self) -> Dataset | None:
        """The evaluation data, or None when the manifest gives none."""
        return self.load("evaluation") if "evaluation" in self.data else None

    @property
    def has_labels(self) -> bool:
        ev = self.evaluation
        return ev is not None and ev.has_labels

    @property
    def output_names(self) -> list[str]:
        return self.source.output_names

    # -- inputs ------------------------------------------------------------------------------
    def inputs_of(self, dataset: Dataset):
        """A data set's arrays for the model's inputs: one array for a single-input model, else by name."""
        names = self.source.input_names
        arrays = dataset.inputs(names)
        return arrays[names[0]] if len(names) == 1 else arrays

    def sample_inputs(self):
        """Real inputs to time and probe a model with: the evaluation data, else the calibration or
        training data (never zeros or random arrays, which a quantized model may not survive)."""
        for name in ("evaluation", "calibration", "training"):
            if name in self.data:
                return self.inputs_of(self.load(name))
        raise InputError(
            "measuring the model needs real inputs, but the manifest gives no data",
            hint="add `data: {evaluation: <URI>}` (or calibration data)",
        )

    def batches(self, inputs=None) -> Iterator[Inputs]:
        """The evaluation inputs (or `inputs`) by input name, `evaluation.batch_size` samples at a time."""
        if inputs is None:
            inputs = self.inputs_of(self.load("evaluation"))
        if not isinstance(inputs, dict):
            inputs = {self.source.input_names[0]: inputs}
        n = len(next(iter(inputs.values())))
        step = self.spec.batch_size
        for start in range(0, n, step):
            yield {k: v[start : start + step] for k, v in inputs.items()}
            release_pages(inputs.values())  # memory-mapped data: the batch read is handed back

    def predict(self, predict_batch: Callable[[Inputs], Outputs], inputs=None) -> Outputs:
        """A model's outputs by name on the evaluation inputs (or `inputs`): the one loop every
        prediction goes through, `predict_batch` called on one batch at a time.

        A batch the model cannot take whole (a kernel's size limit, such as the int16x8
        convolution's 32-bit im2col buffer, or memory) is retried in halves, down to one sample,
        before anything counts as an error; the smaller size that worked is kept for the rest of
        this call and said in :attr:`notes`."""
        chunks: list[Outputs] = []
        fits: int | None = None
        # On streamed (memory-mapped) evaluation data the outputs go to files too, a batch at a time.
        files = self._output_files() if inputs is None and self.load("evaluation").memory_mapped else None
        for batch in self.batches(inputs):
            fits = self._predict_fitting(predict_batch, batch, fits, chunks)
            if files is not None:
                for chunk in chunks:
                    files.append(chunk)
                chunks.clear()
        if files is not None:
            return files.finish()
        return {name: np.concatenate([c[name] for c in chunks], axis=0) for name in chunks[0]} if chunks else {}

    def _output_files(self) -> OutputFiles:
        self._predictions += 1
        return OutputFiles(self.workdir / "outputs" / str(self._predictions))

    def _predict_fitting(self, predict_batch, batch: Inputs, fits: int | None, chunks: list[Outputs]) -> int | None:
        """Predict `batch` in pieces of `fits` samples (all of it when None), halving on failure;
        returns the piece size that worked."""
        n = len(next(iter(batch.values())))
        step, start = min(n, fits or n), 0
        while start < n:
            try:
                chunks.append(predict_batch({k: v[start : start + step] for k, v in batch.items()}))
                start += step
            except Exception as exc:
                if step == 1:
                    raise
                failed, step = step, max(1, step // 2)
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                note = f"a batch of {failed} failed ({type(exc).__name__}: {first}); retried at {step}"
                if note not in self.notes:
                    self.notes.append(note)
        return step if step < n or fits is not None else None

    # -- the reference -----------------------------------------------------------------------
    def reference_outputs(self) -> Outputs:
        """The source model's outputs on the evaluation data by output name, computed once: the
        baseline that fidelity metrics compare every candidate (and every search trial) with."""
        if self._reference is None:
            self._reference = self.predict(self.source.predict_batch)
        return self._reference

    def use_reference(self, outputs: Mapping[str, np.ndarray]) -> None:
        """Take the baseline's outputs computed elsewhere (a search trial gets its parent's,
        memory-mapped)."""
        self._reference = dict(outputs)


def loader_batches(loader, path: Path, field: str, batch_size: int, names: list[str] | None) -> Iterator[dict[str, np.ndarray]]:
    """A loader's batches of the arrays `names` (all when None); a loader whose ``batches`` takes
    no `names` reads them all, and the rest are dropped here."""
    import inspect

    if names is not None and "names" in inspect.signature(loader.batches).parameters:
        yield from loader.batches(path, field, batch_size, names=names)
        return
    for arrays in loader.batches(path, field, batch_size):
        yield arrays if names is None else {k: v for k, v in arrays.items() if k in names}


def renamed(arrays: dict[str, np.ndarray], features: Mapping[str, str], field: str, file: str) -> dict[str, np.ndarray]:
    """The arrays under the stage's names (`features`: the stage's name -> the name in the data)."""
    if not features:
        return arrays
    missing = [f for f in features.values() if f not in arrays]
    if missing:
        raise InputError(
            f"`{field}.features`: `{file}` has no {', '.join(f'`{m}`' for m in missing)} (it has: {', '.join(sorted(arrays)) or 'nothing'})",
            hint="map each of the stage's names to an array or feature the data has",
        )
    return {stage: arrays[name] for stage, name in features.items()}


def data_uri(loaded: LoadedManifest, name: str, run_id: str | None) -> str:
    """The manifest's URI for a data set, ${source.run_id} filled in, a `dataset:<name>` looked up
    in the source model's run, relative paths resolved."""
    uri = loaded.manifest.data.uri(name)
    if uri.startswith(DATASET_PREFIX):
        from pipeline_stage.mlflow_io.source import logged_dataset_uri

        return logged_dataset_uri(run_id, uri[len(DATASET_PREFIX) :], name, f"data.{name}")
    if SOURCE_RUN_PLACEHOLDER in uri:
        if not run_id:
            raise InputError(
                f"`data.{name}` uses {SOURCE_RUN_PLACEHOLDER} but the source model `{loaded.manifest.model}` has no run",
                hint="give the data's full URI",
            )
        uri = uri.replace(SOURCE_RUN_PLACEHOLDER, run_id)
    local = local_data_path(uri, loaded.path)
    return str(local) if local is not None else uri
