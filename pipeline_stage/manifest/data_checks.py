"""Checks of a manifest against its data: metrics that run the model need real inputs, metrics
that need labels need labels, and where a local data path points."""

from __future__ import annotations

from pathlib import Path

from pipeline_stage.contract.errors import ManifestError
from pipeline_stage.host.plugin_host import PluginHost
from pipeline_stage.manifest.loaded import LoadedManifest
from pipeline_stage.manifest.yaml_text import line_for


def check_inputs_for_metrics(loaded: LoadedManifest, host: PluginHost, *, read_data: bool) -> None:
    """Metrics that run the model need real inputs (never zeros: a quantized model can crash on
    them); with `read_data`, metrics that need labels need them in local evaluation data (remote
    data, and any data of a run, is checked when it is loaded)."""
    m, path, lines = loaded.manifest, loaded.path, loaded.lines
    if not (m.data.evaluation or m.data.calibration or m.data.training):
        runs = [n for n in loaded.measured_names() if host.metric_class(n).runs_model]
        if runs:
            raise ManifestError(
                f"metric `{runs[0]}` runs the model on real inputs, but the manifest gives no data",
                path=path,
                line=line_for(lines, ("evaluation",)) or line_for(lines, ()),
                field="data",
                hint="add `data: {evaluation: <URI>}` (or calibration data), or measure only `size_bytes`",
            )
    needing = loaded.needing_labels(host)
    entry = m.data.source("evaluation")
    plain = entry is not None and entry.format is None and not entry.features  # else: checked as the run reads it
    local = local_data_path(entry.uri if plain else None, path)
    if read_data and needing and local is not None and local.exists() and host.loader_for(local.suffix) is not None:
        try:
            dataset = host.loader_for(local.suffix).cls().load(local, source="data.evaluation")
        except Exception:
            return  # unreadable data is reported, with its reason, when the run loads it
        if not dataset.has_labels:
            raise ManifestError(
                f"`{local}` has no labels `y`, but {', '.join(f'`{n}`' for n in needing)} need them",
                path=path,
                line=line_for(lines, ("data", "evaluation")),
                field="data.evaluation",
                hint="add an array `y` to the data, or gate without labels, e.g. `- {metric: fidelity_sqnr_db, min: 20}` "
                "(and `evaluation: {metrics: [fidelity_sqnr_db, size_bytes, latency_p50_ms]}`)",
            )


# `dataset:<name>`: a dataset the source model's run logged as an input (mlflow.log_input), by name
DATASET_PREFIX = "dataset:"


def local_data_path(uri: str | None, manifest_path: str) -> Path | None:
    """A data URI that names a local file, resolved as the run resolves it; None for remote URIs
    and for a `dataset:<name>` (resolved from the source model's run)."""
    if not uri or "://" in uri or uri.startswith(("runs:/", "models:/", DATASET_PREFIX)) or "${" in uri:
        return None
    local = Path(uri)
    if not local.is_absolute() and not manifest_path.startswith("<"):  # "<manifest>": text, not a file
        local = Path(manifest_path).resolve().parent / local
    return local
