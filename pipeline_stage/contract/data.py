"""Data sets for calibration, evaluation and fine-tuning, and the loader contract for formats.

A data URI in the manifest goes through ``mlflow.artifacts.download_artifacts`` (so ``runs:/``,
``models:/``, local paths and every artifact store MLflow supports work), then to the loader
registered for the file's suffix (``register_data_loaders``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from pipeline_stage.contract.errors import InputError


@dataclass(frozen=True)
class Dataset:
    """Features ``x`` (first axis: samples) and optional labels ``y``."""

    x: np.ndarray
    y: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def take(self, n: int) -> "Dataset":
        return Dataset(self.x[:n], None if self.y is None else self.y[:n], self.source)

    def save(self, path) -> str:
        """Write as .npz (`x`, and `y` when there are labels), the format child processes read back."""
        np.savez(path, x=self.x, **({"y": self.y} if self.y is not None else {}))
        return str(path)

    def check(self, *, needs_labels: bool) -> None:
        """Raise InputError for an empty or mismatched data set."""
        if self.x.ndim == 0 or len(self) == 0:
            raise InputError(f"data `{self.source}` has no samples", hint="write at least one row to `x`")
        if needs_labels and self.y is None:
            raise InputError(f"data `{self.source}` has no labels `y`", hint="add an array `y` with one label per row of `x`")
        if self.y is not None and self.y.shape[0] != self.x.shape[0]:
            raise InputError(
                f"data `{self.source}`: `x` has {self.x.shape[0]} rows but `y` has {self.y.shape[0]}",
                hint="give `x` and `y` the same number of rows",
            )
        if not np.issubdtype(self.x.dtype, np.number):
            raise InputError(f"data `{self.source}`: `x` has dtype {self.x.dtype}, expected a numeric array")


class DataLoader:
    """Base class for a data format: subclass, set ``name`` and ``suffixes``, implement ``load``."""

    name: ClassVar[str] = ""
    suffixes: ClassVar[tuple[str, ...]] = ()

    def load(self, path: Path, source: str) -> Dataset:  # pragma: no cover - abstract
        raise NotImplementedError
