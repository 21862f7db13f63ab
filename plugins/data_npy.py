"""Built-in data loaders for NumPy's own array files, read memory-mapped (nothing is loaded until
a batch is read): one `.npy` file, and a folder `<name>.arrays` of `.npy` files, one per array."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline_stage import DataLoader, Dataset, InputError, hookimpl

HINT_NPY = "write it with numpy.save(path, x) (one array: the only input's samples)"
HINT_ARRAYS = "write one file per array into the folder: numpy.save(folder / 'x.npy', x), numpy.save(folder / 'y.npy', y)"


def _open(path: Path, source: str, hint: str) -> np.ndarray:
    try:
        # allow_pickle=False: object arrays would unpickle untrusted bytes.
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"data `{source}`: `{path.name}` is not a readable .npy file: {exc}", hint=hint) from None


class NpyLoader(DataLoader):
    """`.npy`: one array, the samples of the only input (first axis = samples), no labels (gate on
    fidelity). Read memory-mapped."""

    name = "npy"
    suffixes = (".npy",)

    def load(self, path: Path, source: str) -> Dataset:
        return Dataset(x=_open(path, source, HINT_NPY), source=source)


class ArraysLoader(DataLoader):
    """A folder `<name>.arrays` of `.npy` files, one per array, named as in an `.npz` (`x.npy` or one
    per model input, `y.npy` or `y.<output>.npy`). Read memory-mapped: the stage writes TFRecord and
    sharded data into such a folder, and a search trial reads it back so."""

    name = "arrays"
    suffixes = (".arrays",)

    def load(self, path: Path, source: str) -> Dataset:
        if not path.is_dir():
            raise InputError(f"data `{source}`: `{path}` is not a folder of .npy files", hint=HINT_ARRAYS)
        files = sorted(path.glob("*.npy"))
        if not files:
            raise InputError(f"data `{source}`: folder `{path}` holds no .npy files", hint=HINT_ARRAYS)
        return Dataset(arrays={f.name[: -len(".npy")]: _open(f, source, HINT_ARRAYS) for f in files}, source=source)


@hookimpl
def register_data_loaders(register):
    register(NpyLoader)
    register(ArraysLoader)
