"""Built-in data format: NumPy ``.npz`` archives with arrays ``x`` (and ``y`` for labels)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from pipeline_stage import DataLoader, Dataset, InputError, hookimpl


class NpzLoader(DataLoader):
    """`.npz` with `x` (features, first axis = samples) and optional `y` (labels)."""

    name = "npz"
    suffixes = (".npz",)

    def load(self, path: Path, source: str) -> Dataset:
        try:
            # allow_pickle=False: object arrays would unpickle untrusted bytes.
            with np.load(path, allow_pickle=False) as archive:
                if "x" not in archive.files:
                    raise InputError(
                        f"data `{source}` has no array `x` (arrays: {', '.join(archive.files) or 'none'})",
                        hint="save features as `x` and labels as `y`: np.savez(path, x=..., y=...)",
                    )
                x = archive["x"]
                y = archive["y"] if "y" in archive.files else None
        except InputError:
            raise
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
            raise InputError(
                f"data `{source}` is not a readable .npz archive: {exc}", hint="write it with numpy.savez(path, x=..., y=...)"
            ) from None
        return Dataset(x=x, y=y, source=source)


@hookimpl
def register_data_loaders(register):
    register(NpzLoader)
