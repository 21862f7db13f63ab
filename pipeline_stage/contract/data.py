"""Data sets for calibration, evaluation and fine-tuning, and the loader contract for formats.

A data URI in the manifest goes through ``mlflow.artifacts.download_artifacts`` (so ``runs:/``,
``models:/``, local paths and every artifact store MLflow supports work), then to the loader
registered for the file's suffix (``register_data_loaders``).

Data bigger than memory: a loader that ``streams`` (TFRecord), and every glob of shards, is read
batch by batch (:meth:`DataLoader.batches`) into one ``.npy`` file per array on disk, and the data
set's arrays are memory-mapped views of those files; the stage reads them a batch at a time and
hands the pages back after each (:func:`release_pages`), so its memory does not grow with the
number of samples.
"""

from __future__ import annotations

import hashlib
import mmap
from pathlib import Path
from typing import Callable, ClassVar, Iterator

import numpy as np

from pipeline_stage.contract.errors import InputError

LABEL = "y"  # `y` labels the only output; `y.<output>` labels one output of several


class Dataset:
    """Arrays by name, first axis the samples: one per model input (named after the input; `x` means
    the only input) and optional labels, `y` (one output) or `y.<output>`.

    ``Dataset(x=..., y=..., source=...)`` still builds the single-input case.
    """

    def __init__(
        self,
        x: np.ndarray | None = None,
        y: np.ndarray | None = None,
        source: str = "",
        *,
        arrays: dict[str, np.ndarray] | None = None,
    ):
        named = dict(arrays or {})
        if x is not None:
            named["x"] = x
        if y is not None:
            named[LABEL] = y
        self.arrays: dict[str, np.ndarray] = named
        self.source = source
        self.content_digests: dict[str, str] = {}  # sha256 of each array's bytes, where already known
        # The source model's `feed` (its inputs in the converted model's layout): applied by
        # `inputs`, so the arrays, their digest and their files stay as the data was logged.
        self.feed: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None

    def digest(self) -> str:
        """sha256 (hex) of the arrays' names, dtypes, shapes and the sha256 of each one's bytes: the
        same data gives the same digest whatever file or format it came from (MLflow's dataset
        lineage records it). Data read in a streaming pass hashed its bytes in that pass."""
        digest = hashlib.sha256()
        for name in sorted(self.arrays):
            array = self.arrays[name]
            content = self.content_digests.get(name) or bytes_digest(array)
            digest.update(f"{name}:{array.dtype.str}:{tuple(array.shape)}:{content};".encode())
        return digest.hexdigest()

    # -- inputs ----------------------------------------------------------------------------------
    @property
    def feature_names(self) -> list[str]:
        return [k for k in self.arrays if not _is_label(k)]

    @property
    def x(self) -> np.ndarray:
        """The only input: the array `x`, or the one array that is not a label."""
        if "x" in self.arrays:
            return self.arrays["x"]
        names = self.feature_names
        if len(names) != 1:
            raise InputError(f"data `{self.source}` has several inputs ({', '.join(names)}); the model reads them by name")
        return self.arrays[names[0]]

    def inputs(self, names: list[str]) -> dict[str, np.ndarray]:
        """The arrays for the model's inputs, by input name (`x` stands for the only input), as
        the model takes them (:attr:`feed`)."""
        found = self._inputs(names)
        return self.feed(found) if self.feed is not None else found

    def _inputs(self, names: list[str]) -> dict[str, np.ndarray]:
        if len(names) == 1 and "x" in self.arrays and names[0] not in self.arrays:
            return {names[0]: self.arrays["x"]}
        missing = [n for n in names if n not in self.arrays]
        if missing:
            raise InputError(
                f"data `{self.source}` has no array for model input {', '.join(f'`{n}`' for n in missing)} "
                f"(arrays: {', '.join(self.arrays)})",
                hint="save one array per model input, named after the input: np.savez(path, "
                + ", ".join(f"{n}=..." for n in names)
                + ")",
            )
        return {n: self.arrays[n] for n in names}

    # -- labels ----------------------------------------------------------------------------------
    @property
    def y(self) -> np.ndarray | None:
        """The labels of the only output (`y`), or None."""
        return self.arrays.get(LABEL)

    @property
    def has_labels(self) -> bool:
        return any(_is_label(k) for k in self.arrays)

    def labels(self, outputs: list[str]) -> dict[str, np.ndarray]:
        """Labels by output name: `y.<output>`; `y` labels the only output, or, with several, each
        output that has no label of its own (a metric uses it where it fits: accuracy where the
        output scores the label's classes)."""
        out = {o: self.arrays[f"{LABEL}.{o}"] for o in outputs if f"{LABEL}.{o}" in self.arrays}
        if LABEL in self.arrays:
            out.update({o: self.arrays[LABEL] for o in outputs if o not in out})
        return out

    # -- the rest --------------------------------------------------------------------------------
    def __len__(self) -> int:
        first = next(iter(self.arrays.values()))
        return int(first.shape[0]) if first.ndim else 0

    def take(self, n: int) -> "Dataset":
        taken = Dataset(arrays={k: v[:n] for k, v in self.arrays.items()}, source=self.source)
        taken.feed = self.feed
        return taken

    @property
    def memory_mapped(self) -> bool:
        """Whether the arrays are read from files on disk as they are used (not held in memory)."""
        return any(isinstance(a, np.memmap) for a in self.arrays.values())

    def save(self, path) -> str:
        """Write as .npz (every array under its name)."""
        np.savez(path, **self.arrays)
        return str(path)

    def files(self, folder) -> dict[str, str]:
        """Each array as a .npy file that a child process memory-maps, by name: the file the array
        is already mapped from whole (a streamed set's spool: nothing copied), else written once
        into `folder`. A child given these reads the set a batch at a time, never whole."""
        out: dict[str, str] = {}
        for i, (name, array) in enumerate(self.arrays.items()):
            mapped = _mapped_whole(array)
            if mapped is None:
                Path(folder).mkdir(parents=True, exist_ok=True)
                mapped = str(Path(folder) / f"{i}.npy")
                np.save(mapped, array)
            out[name] = mapped
        return out

    def check(self, *, needs_labels: bool) -> None:
        """Raise InputError for an empty or mismatched data set."""
        if not self.feature_names:
            raise InputError(
                f"data `{self.source}` has no input array", hint="save the features as `x` (or one array per model input)"
            )
        if any(a.ndim == 0 for a in self.arrays.values()) or len(self) == 0:
            raise InputError(f"data `{self.source}` has no samples", hint="write at least one row to `x`")
        if needs_labels and not self.has_labels:
            raise InputError(f"data `{self.source}` has no labels `y`", hint="add an array `y` with one label per row of `x`")
        rows = {k: int(a.shape[0]) for k, a in self.arrays.items()}
        if len(set(rows.values())) > 1:
            first = min(rows.items(), key=lambda kv: kv[0] != "x")  # `x` first, when there is one
            other = next((k, n) for k, n in rows.items() if n != first[1])
            raise InputError(
                f"data `{self.source}`: `{first[0]}` has {first[1]} rows but `{other[0]}` has {other[1]}",
                hint="give every array the same number of rows",
            )
        for name in self.feature_names:
            if not np.issubdtype(self.arrays[name].dtype, np.number):
                raise InputError(f"data `{self.source}`: `{name}` has dtype {self.arrays[name].dtype}, expected a numeric array")


def _is_label(name: str) -> bool:
    return name == LABEL or name.startswith(LABEL + ".")


CHUNK_BYTES = 1 << 24  # how much of an array is read (and hashed) at a time: 16 MB


def bytes_digest(array: np.ndarray) -> str:
    """sha256 of an array's bytes in C order, read 16 MB at a time; a memory-mapped array's pages
    are handed back as it goes, so hashing a set bigger than memory does not fill it."""
    digest = hashlib.sha256()
    rows = max(1, CHUNK_BYTES // max(1, array[:1].nbytes)) if array.ndim else 1
    for start in range(0, len(array) if array.ndim else 1, rows):
        digest.update(np.ascontiguousarray(array[start : start + rows] if array.ndim else array).tobytes())
        release_pages([array])
    return digest.hexdigest()


def _mapped_whole(array: np.ndarray) -> str | None:
    """The .npy file a memory-mapped array maps whole (not a slice of it), else None."""
    filename = getattr(array, "filename", None)
    if not isinstance(array, np.memmap) or not filename or not str(filename).endswith(".npy"):
        return None
    try:
        on_disk = np.load(filename, mmap_mode="r")
    except (OSError, ValueError):
        return None
    # a view with every row, in order, is the file itself (a slice of rows has another shape)
    same = on_disk.shape == array.shape and on_disk.dtype == array.dtype and array.flags.c_contiguous
    return str(filename) if same else None


def release_pages(arrays) -> None:
    """Hand back the pages of memory-mapped arrays that were read (they stay in the page cache, out
    of this process's resident memory); arrays held in memory are left alone."""
    seen: set[int] = set()
    for array in arrays:
        mapped = getattr(array, "_mmap", None)
        if mapped is not None and id(mapped) not in seen and hasattr(mapped, "madvise"):
            seen.add(id(mapped))
            try:
                mapped.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass  # a platform without it only keeps the pages longer


class DataLoader:
    """Base class for a data format: subclass, set ``name`` and ``suffixes``, implement ``load``
    (the whole file as a :class:`Dataset`) or, for a format bigger than memory, set ``streams`` and
    implement ``batches``.

    * ``load(path, source)``: the file's arrays by name (``source`` names the data set in messages,
      e.g. ``data.evaluation``).
    * ``batches(path, source, batch_size, names=None)``: the same arrays, ``batch_size`` samples at
      a time; with ``names``, only those (the manifest's ``features`` says which). The default
      reads ``load`` whole; the stage calls it for each shard of a glob, for every file of a
      loader that ``streams`` and for data given with options, and writes the batches to disk as
      it goes. (An implementation may leave ``names`` out: the stage then drops the rest.)
    * ``streams``: read through ``batches`` even for one file (the stage then never holds the set).
    """

    name: ClassVar[str] = ""
    suffixes: ClassVar[tuple[str, ...]] = ()
    streams: ClassVar[bool] = False

    def load(self, path: Path, source: str) -> Dataset:  # pragma: no cover - abstract
        raise NotImplementedError

    def batches(
        self, path: Path, source: str, batch_size: int, names: list[str] | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        dataset = self.load(path, source)
        for start in range(0, len(dataset), batch_size):
            yield {k: v[start : start + batch_size] for k, v in dataset.arrays.items() if names is None or k in names}
