"""Built-in data format: NumPy ``.npz`` archives with arrays ``x`` (and ``y`` for labels)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from pipeline_stage import DataLoader, Dataset, InputError, hookimpl


class NpzLoader(DataLoader):
    """`.npz`: one array per model input (`x` for the only input; first axis = samples) and optional
    labels `y` (one output) or `y.<output>`."""

    name = "npz"
    suffixes = (".npz",)

    def load(self, path: Path, source: str) -> Dataset:
        try:
            # allow_pickle=False: object arrays would unpickle untrusted bytes.
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except InputError:
            raise
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
            raise InputError(
                f"data `{source}` is not a readable .npz archive: {exc}", hint="write it with numpy.savez(path, x=..., y=...)"
            ) from None
        if not arrays:
            raise InputError(f"data `{source}` holds no arrays", hint="write it with numpy.savez(path, x=..., y=...)")
        return Dataset(arrays=arrays, source=source)


@hookimpl
def register_data_loaders(register):
    register(NpzLoader)
