"""Data sets read as a stream into files on disk: the shards of a glob, or a format whose loader
streams (TFRecord), batch by batch into one ``.npy`` file per array, hashed as they are written.

What comes back is a :class:`Dataset` of memory-mapped views of those files (a folder
``<name>.arrays``, which the ``.arrays`` loader reads back, so a search trial opens the same files
instead of a copy). Memory holds one batch at a time, whatever the number of samples.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from pipeline_stage.contract.data import Dataset
from pipeline_stage.contract.errors import InputError

HEADER_BYTES = 256  # an .npy header with room for any shape, rewritten once the row count is known
SUFFIX = ".arrays"


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """An .npy (version 1.0) header of exactly HEADER_BYTES bytes for a C-order array."""
    text = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)})
    body = text + " " * (HEADER_BYTES - 10 - len(text) - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1")


class _ArrayFile:
    """One array's .npy file, appended to a batch at a time."""

    def __init__(self, path: Path, first: np.ndarray):
        self.path, self.dtype, self.trailing = path, first.dtype, tuple(first.shape[1:])
        self.rows = 0
        self.hash = hashlib.sha256()
        self.file = open(path, "wb")
        self.file.write(b"\0" * HEADER_BYTES)

    def append(self, batch: np.ndarray, where: str) -> None:
        if batch.dtype != self.dtype or tuple(batch.shape[1:]) != self.trailing:
            raise InputError(
                f"{where}: samples of dtype {batch.dtype} and shape {tuple(batch.shape[1:])}, but the data before had "
                f"{self.dtype} and {self.trailing}",
                hint="write every shard with the same dtypes and shapes",
            )
        data = np.ascontiguousarray(batch)
        self.file.write(memoryview(data).cast("B"))
        self.hash.update(memoryview(data).cast("B"))
        self.rows += len(batch)

    def finish(self, shape: tuple[int, ...]) -> str:
        self.file.seek(0)
        self.file.write(npy_header(self.dtype, (self.rows, *shape)))
        self.file.close()
        return self.hash.hexdigest()


def spool(
    batches: Iterable[tuple[str, dict[str, np.ndarray]]],
    folder: Path,
    source: str,
    *,
    shapes: dict[str, tuple] | None = None,
    limit: int | None = None,
) -> Dataset:
    """Write `batches` ((where, arrays by name) pairs, `where` naming the shard for messages) into
    `folder` (``<name>.arrays``), at most `limit` samples. An input whose samples are flat (one
    axis) and whose size is that of the model's static shape in `shapes` is given that shape (a
    TFRecord feature holds the flattened tensor)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    files: dict[str, _ArrayFile] = {}
    rows = 0
    for where, arrays in batches:
        if not files:
            bad = [name for name in arrays if "/" in name or name.startswith(".")]
            if bad:
                raise InputError(
                    f"{where} has arrays named {', '.join(f'`{b}`' for b in bad)}, which the stage cannot keep under that name",
                    hint="map the stage's names to them: `{uri: ..., features: {x: <name>, y: <name>}}`",
                )
            files = {name: _ArrayFile(folder / f"{name}.npy", np.asarray(a)) for name, a in arrays.items()}
        elif set(arrays) != set(files):
            raise InputError(
                f"{where} has arrays {', '.join(sorted(arrays))}, but the data before had {', '.join(sorted(files))}",
                hint="write every shard with the same arrays",
            )
        n = len(next(iter(arrays.values())))
        take = n if limit is None else min(n, limit - rows)
        for name, array in arrays.items():
            files[name].append(np.asarray(array)[:take], f"{where}: `{name}`")
        rows += take
        if limit is not None and rows >= limit:
            break  # before the next batch: a remote shard not needed is never downloaded
    if not files:
        raise InputError(f"data `{source}` has no samples", hint="write at least one record")
    digests = {}
    for name, f in files.items():
        digests[name] = f.finish(_shape_for(f.trailing, (shapes or {}).get(name)))
    dataset = Dataset(arrays={n: np.load(f.path, mmap_mode="r") for n, f in files.items()}, source=source)
    dataset.content_digests = digests
    return dataset


def _shape_for(trailing: tuple[int, ...], model_shape: tuple | None) -> tuple[int, ...]:
    static = model_shape is not None and all(isinstance(d, int) and d > 0 for d in model_shape)
    if static and len(trailing) == 1 and len(model_shape) > 1 and int(np.prod(model_shape)) == trailing[0]:
        return tuple(int(d) for d in model_shape)
    return trailing


def shard_batches(
    shards: list, fetch: Callable[[object], Path], read: Callable[[Path], Iterator[dict]], discard: bool
) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """The batches of each shard in turn: `fetch` gives a shard's local file (downloading it),
    `read` its batches; with `discard`, a shard's file is deleted once read (a downloaded copy)."""
    for shard in shards:
        path = fetch(shard)
        for arrays in read(path):
            yield f"`{path.name}`", arrays
        if discard:
            path.unlink(missing_ok=True)


class OutputFiles:
    """A model's outputs by name, written a batch at a time into `folder` (one .npy per output,
    named by position, `names.json` mapping them back), read back memory-mapped: the outputs on a
    streamed data set are never held whole."""

    def __init__(self, folder: Path):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        self.folder = folder
        self.files: dict[str, _ArrayFile] = {}

    def append(self, outputs: dict[str, np.ndarray]) -> None:
        for name, array in outputs.items():
            array = np.asarray(array)
            if name not in self.files:
                self.files[name] = _ArrayFile(self.folder / f"{len(self.files)}.npy", array)
            self.files[name].append(array, f"output `{name}`")

    def finish(self) -> dict[str, np.ndarray]:
        names = {}
        for name, f in self.files.items():
            f.finish(f.trailing)
            names[f.path.name] = name
        (self.folder / "names.json").write_text(json.dumps(names))
        return load_outputs(self.folder)


def save_outputs(outputs: dict[str, np.ndarray], folder: Path) -> str:
    """Write outputs by name as :class:`OutputFiles` does (a memory-mapped array is copied a
    block at a time), for another process to read with :func:`load_outputs`."""
    files = OutputFiles(folder)
    for name, array in outputs.items():
        rows = max(1, (1 << 24) // max(1, array[:1].nbytes))
        for start in range(0, len(array), rows):
            files.append({name: array[start : start + rows]})
    files.finish()
    return str(folder)


def load_outputs(folder: Path) -> dict[str, np.ndarray]:
    """Outputs by name from a folder :class:`OutputFiles` wrote, memory-mapped."""
    names = json.loads((Path(folder) / "names.json").read_text())
    return {name: np.load(Path(folder) / file, mmap_mode="r") for file, name in names.items()}
