"""The source model once it is on local disk: which installed source plugin holds it, opened.

Finding and downloading the model is MLflow I/O (:mod:`pipeline_stage.mlflow_io.source`); the
kinds are plugins (:mod:`pipeline_stage.contract.sources`): this module asks them, in order,
whether they recognise the download, by the MLmodel file's flavors first and then by its files.
It also holds what every kind shares: outputs by name, and a ``.tflite``'s predictions on a batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipeline_stage.contract.errors import InputError
from pipeline_stage.contract.report import SourceRef
from pipeline_stage.contract.sources import ModelSource, SourceOptions

MLMODEL = "MLmodel"


def flavors_of(root: Path) -> list[str]:
    """The MLflow flavors the MLmodel file at (or nearest under) `root` names; [] without one."""
    import yaml

    if root.is_file():
        return []
    found = sorted(root.rglob(MLMODEL), key=lambda p: len(p.parts))
    if not found:
        return []
    try:
        text = yaml.safe_load(found[0].read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    flavors = text.get("flavors") if isinstance(text, dict) else None
    return sorted(flavors) if isinstance(flavors, dict) else []


def recognize(root: Path, sources: Mapping[str, type[ModelSource]]) -> tuple[type[ModelSource], Path]:
    """The source class that holds the model under `root`, and the file or folder it opens.

    Sources whose ``flavors`` the MLmodel file names are asked first, then the others, each in
    registration order; the first whose ``locate`` finds its files wins.
    """
    flavors = flavors_of(root)
    claimed = [cls for cls in sources.values() if set(cls.flavors) & set(flavors)]
    for cls in claimed + [cls for cls in sources.values() if cls not in claimed]:
        path = cls.locate(root)
        if path is not None:
            return cls, path
    installed = "; ".join(
        f"{name} ({', '.join([*cls.flavors, *cls.suffixes]) or 'by its files'})" for name, cls in sources.items()
    )
    shown = root.name if root.is_file() else str(root)
    raise InputError(
        f"no installed model source recognises `{shown}`"
        + (f" (its MLmodel names the flavors {', '.join(flavors)})" if flavors else " (it has no MLmodel file)")
        + f"; installed sources: {installed or 'none'}",
        hint="install the source plugin for that kind (`pipeline-stage plugins` lists the sources), "
        "or log the model with mlflow.tensorflow.log_model(model, name='model')",
    )


def open_source(
    root: Path, info: SourceRef, sources: Mapping[str, type[ModelSource]], options: SourceOptions, kind: str | None = None
) -> ModelSource:
    """Open the model under `root` with the source that recognises it (or the source `kind`, as a
    search trial reopens the stage's). A ``signature:`` is refused for a kind that has none."""
    if kind is not None:
        cls = sources[kind]
        path = cls.locate(root) or root
    else:
        cls, path = recognize(root, sources)
    if options.signature != "serving_default" and not cls.takes_signature:
        raise InputError(
            f"`signature: {options.signature}` selects a signature, but `{info.uri}` is {cls.title or cls.name}, which has none to select",
            hint="remove `signature:` from the manifest",
        )
    if options.io_layout not in cls.layouts:
        raise InputError(
            f"`conversion.io_layout: {options.io_layout}` changes the model's input layout, but `{info.uri}` is "
            f"{cls.title or cls.name}, which converts in its own layout only ({', '.join(cls.layouts)})",
            hint="remove `conversion.io_layout` from the manifest",
        )
    return cls.open(path, info, options)


def tflite_predict_batch(model, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
    """A .tflite's outputs by name on one batch (a `TFLiteModel`, float32 inputs); the only input is
    passed as an array, because the interpreter may name it otherwise than the source model does."""
    feed = {k: np.asarray(v, dtype=np.float32) for k, v in inputs.items()}
    n = len(next(iter(feed.values())))
    return outputs_by_name(
        model.predict_outputs(feed if len(feed) > 1 else next(iter(feed.values())), batch_size=n), output_names
    )


def outputs_by_name(out: Any, names: list[str]) -> dict[str, np.ndarray]:
    """A model's outputs (a dict, a list, or one array) by the model's output names; a dict whose
    names differ (a converter's `output_0, output_1`) is taken in order, and a dict with some of the
    names (a model whose other outputs a step removed) keeps those."""
    if isinstance(out, dict):
        if out and set(out) <= set(names):
            return {n: np.asarray(out[n]) for n in names if n in out}
        values = list(out.values())
    else:
        values = list(out) if isinstance(out, (list, tuple)) else [out]
    if len(values) != len(names):
        raise InputError(f"the model returned {len(values)} outputs, expected {len(names)} ({', '.join(names)})")
    return {n: np.asarray(v) for n, v in zip(names, values)}


def aligned_names(given: list[str], names: list[str]) -> list[str]:
    """The model's names for outputs named `given` (the rule of :func:`outputs_by_name`)."""
    return list(outputs_by_name(dict.fromkeys(given), names))
