"""The manifest's schema: pydantic models of every field, with their defaults and descriptions.

No TensorFlow, no plugin knowledge: the step params, metric names and search moves are checked
against the installed plugins by :mod:`pipeline_stage.manifest.loader`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline_stage.contract.gates import Gate
from pipeline_stage.host.plugin_host import PluginHost

DATA_SETS = ("calibration", "evaluation", "training")
# MLflow registered-model names: printable, no slashes or colons (they break models:/ URIs).
MODEL_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.\- ]{0,255}$"
ALIAS_RE = r"^[A-Za-z_][A-Za-z0-9_\-]{0,255}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSource(_Strict):
    """A data set given as a mapping, where its URI alone does not say enough."""

    uri: str = Field(
        description="Where the data is: any URI MLflow can download, a local path, a glob of shards, or `dataset:<name>`."
    )
    format: str | None = Field(
        None,
        description="The data loader by name (`npz`, `npy`, `arrays`, `tfrecord`, or a plugin's; `pipeline-stage plugins` "
        "lists them). Default: the one for the file's suffix.",
    )
    features: dict[str, str] = Field(
        default_factory=dict,
        description="Where the names in the data differ from the stage's: the stage's name (a model input, `x`, `y` or "
        "`y.<output>`) -> the array or feature in the data, e.g. `{x: image, y: label}`. Only these are read.",
    )
    max_samples: int | None = Field(None, ge=1, description="Read at most this many samples (the first ones).")


DataEntry = str | DataSource | None


class DataSpec(_Strict):
    """Where the data comes from: any URI MLflow can download (runs:/, models:/, paths, stores), a
    glob of shards in its file name (`eval-*.tfrecord`, local or in a run's artifacts), or
    `dataset:<name>`, a dataset the source model's run logged as an input (mlflow.log_input).
    Formats by suffix: `.npz`, `.npy`, `.tfrecord`, a folder `.arrays` of `.npy` files. Each entry
    may instead be a mapping `{uri, format, features, max_samples}`."""

    calibration: DataEntry = Field(None, description="Representative inputs for int8 calibration (`x`).")
    evaluation: DataEntry = Field(
        None, description="Held-out data for metrics and gates (`x`; labels `y` for metrics such as accuracy)."
    )
    training: DataEntry = Field(None, description="Labelled data for fine-tuning steps (`x`, `y`).")

    def source(self, name: str) -> DataSource | None:
        """A data set's entry as a mapping (a plain URI is `{uri: ...}`), or None when not given."""
        value = getattr(self, name)
        return DataSource(uri=value) if isinstance(value, str) else value

    def uri(self, name: str) -> str | None:
        """A data set's URI as written, or None when not given."""
        source = self.source(name)
        return source.uri if source is not None else None


class EvaluationSpec(_Strict):
    """How candidate and baseline are measured."""

    metrics: list[str] | None = Field(
        None,
        description="Metrics computed for baseline and candidate; gated metrics are always added. Default: "
        "accuracy (when evaluation data is given), size_bytes, latency_p50_ms.",
    )
    per_step: list[str] = Field(
        default_factory=lambda: ["size_bytes"],
        description="Metrics recorded after every step (e.g. add `accuracy` to see what each step cost).",
    )
    max_samples: int | None = Field(None, ge=1, description="Evaluate on at most this many samples.")
    batch_size: int = Field(64, ge=1, le=4096, description="Batch size for accuracy evaluation.")
    threads: int | None = Field(
        None, ge=1, le=256, description="Interpreter threads for accuracy evaluation (default: all cores)."
    )
    latency_runs: int = Field(100, ge=5, le=100000, description="Invocations for latency (batch 1, 1 thread, XNNPACK).")
    latency_rounds: int = Field(
        5,
        ge=2,
        le=100,
        description="Alternating rounds in which the baseline and the candidate are timed side by side (latency_runs "
        "split between them); a latency gate fails only by more than the spread across rounds.",
    )


class RegisterSpec(_Strict):
    """Where the optimized model goes in the MLflow Model PluginHost."""

    name: str = Field(pattern=MODEL_NAME_RE, description="Registered model name (created if missing).")
    alias: str | None = Field(None, pattern=ALIAS_RE, description="Alias moved to the new version only when every gate passes.")
    on_failure: Literal["skip", "register"] = Field(
        "skip",
        description="On a failed gate: `skip` registers nothing; `register` registers the version tagged as failed, never aliased.",
    )
    tags: dict[str, str] = Field(default_factory=dict, description="Extra tags for the new version.")
    priority: int = Field(
        0,
        description="Rank of this chain for the alias: the alias goes to the newest passing version "
        "of the highest-priority chain registered for it (so concurrent stages agree).",
    )


class ConversionSpec(_Strict):
    """Converter options that are the manifest author's call, not a step's."""

    allow_select_tf_ops: bool = Field(
        False, description="Let ops without a TFLite builtin run as TF Select ops (needs the Flex delegate at run time)."
    )
    allow_custom_ops: bool = Field(False, description="Keep unknown ops as custom ops (the runtime must provide them).")
    io_layout: Literal["source", "channels_last"] = Field(
        "source",
        description=(
            "The registered model's image inputs and outputs: `source` keeps the layout the model was trained in "
            "(a PyTorch model's NCHW); `channels_last` registers NHWC ones, what mobile runtimes and their delegates "
            "want (a PyTorch source; the data stays as the training run logged it, the stage transposes it)."
        ),
    )


class CompileTarget(_Strict):
    """One accelerator target with its compiler's options."""

    target: str = Field(
        pattern=r"^[a-z0-9_]+/[A-Za-z0-9_]+$",
        description="`<compiler>/<soc>`, e.g. `qualcomm/SM8650` (`pipeline-stage plugins` lists compilers and SoCs).",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="The compiler's options for this target.")


class CompileSpec(_Strict):
    """Ahead-of-time compiled models, one per accelerator target, registered beside the portable one."""

    targets: list[CompileTarget | str] = Field(
        min_length=1, description="`<compiler>/<soc>` strings, or `{target: <compiler>/<soc>, options: {...}}`."
    )
    evaluate: bool = Field(
        True, description="Evaluate each compiled model this machine can run with the manifest's metrics and gates."
    )


class SearchBudget(_Strict):
    """When the search stops trying."""

    trials: int = Field(12, ge=1, le=1000, description="Most trials (each a full chain run in a child process).")
    seconds: float = Field(900, gt=0, description="Wall-clock budget of the search; no trial starts after it.")


class SearchSpec(_Strict):
    """Accuracy-aware search: when the chain as written may fail its gates, try alternatives."""

    strategy: Literal["candidates", "auto"] = Field(
        description=(
            "candidates: try the chain and the listed alternative chains (cheapest first); auto: start from the chain "
            "and apply the search moves the installed plugins register (`pipeline-stage plugins` lists them)."
        )
    )
    objective: list[str] = Field(
        default_factory=lambda: ["latency_p50_ms", "size_bytes"],
        min_length=1,
        description=(
            "Metrics that rank passing trials, most important first (each in its own good direction); one name or a list."
        ),
    )
    candidates: list[list[Any]] = Field(
        default_factory=list, description="strategy candidates: alternative chains, each a list of steps."
    )
    stop_at_first_pass: bool = Field(
        False, description="candidates: stop at the first passing chain in cost order instead of trying all."
    )
    moves: list[str] | None = Field(
        None, description="auto: the search moves it may make, by name (default: every installed move)."
    )
    max_float_nodes: int = Field(8, ge=1, le=1000, description="auto: most nodes kept in float (the keep_float_nodes move).")
    budget: SearchBudget = Field(default_factory=SearchBudget)
    parallel: int | None = Field(None, ge=1, le=256, description="Trials run at once (default: the machine's cores).")
    trials_per_worker: int = Field(
        6,
        ge=1,
        le=1000,
        description="Trials one worker process runs before it is replaced (the TFLite converter leaks memory on every "
        "call); workers start with the run, so TensorFlow is imported once per worker, not once per trial.",
    )
    tie_tolerance: float = Field(
        0.05,
        ge=0,
        lt=1,
        description=(
            "Objective values within this relative distance count as equal (timings are noisy), so the next objective decides."
        ),
    )
    seed: int = Field(0, description="Seed for every trial's fine-tuning steps; the same inputs and seed give the same search.")

    @field_validator("objective", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class Manifest(_Strict):
    """A pipeline-stage manifest."""

    model: str | None = Field(
        None,
        description="models:/name@alias, models:/name/N, runs:/<id>/path, or a local .keras/SavedModel path. `--model-uri` overrides it.",
    )
    signature: str = Field(
        "serving_default",
        min_length=1,
        description="For a SavedModel source: the signature to optimize (its inputs and outputs are the model's).",
    )
    data: DataSpec = Field(default_factory=DataSpec)
    chain: list[Any] = Field(description="Ordered steps; each item is `step_name: {params}` (or just `step_name`).")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    gates: list[Gate] = Field(default_factory=list)
    # `register` is a BaseModel attribute name, hence the alias.
    registration: RegisterSpec | None = Field(
        None, alias="register", description="Where the result is registered; omit to only evaluate."
    )
    conversion: ConversionSpec = Field(default_factory=ConversionSpec)
    search: SearchSpec | None = Field(None, description="Search for a chain that passes the gates (docs/search.md).")
    compile: CompileSpec | None = Field(
        None, description="Compile the model for accelerator targets with their vendors' compilers (docs/accelerators.md)."
    )
    experiment: str = Field("pipeline-stage", min_length=1, description="MLflow experiment of the stage's runs.")
    allow_unsafe_deserialization: bool = Field(
        False, description="Load Keras models with safe_mode off (runs Lambda layers' code). Only for models you trust."
    )

    @field_validator("model")
    @classmethod
    def _model_uri(cls, value: str | None) -> str | None:
        if value is not None:
            check_model_uri(value)
        return value


def check_model_uri(uri: str) -> None:
    """Raise ValueError for a model URI that can never resolve."""
    if uri.startswith("models:/"):
        rest = uri[len("models:/") :]
        if not (
            re.fullmatch(r"[^/@]+@[A-Za-z_][\w\-]*", rest)
            or re.fullmatch(r"[^/@]+/(\d+|latest)", rest)
            or re.fullmatch(r"m-[0-9a-f]+", rest)
        ):
            raise ValueError(f"`{uri}` is not a model registry URI: use models:/<name>@<alias> or models:/<name>/<version>")
    elif uri.startswith("runs:/"):
        if not re.fullmatch(r"runs:/[0-9a-zA-Z_\-]+/.+", uri) and not re.fullmatch(r"runs:/[0-9a-zA-Z_\-]+/?", uri):
            raise ValueError(f"`{uri}` is not a run URI: use runs:/<run_id>/<artifact path>")
    elif not uri.strip():
        raise ValueError("the model URI is empty")


def manifest_json_schema(host: PluginHost) -> dict[str, Any]:
    """JSON Schema of the manifest, with each installed step's params (for editor completion)."""
    schema = Manifest.model_json_schema()
    items = []
    for name, provided in sorted(host.steps.items()):
        params_schema = provided.cls.Params.model_json_schema()
        defs = params_schema.pop("$defs", {})
        schema.setdefault("$defs", {}).update(defs)
        params_schema.setdefault("description", provided.cls.summary())
        items.append(
            {
                "type": "object",
                "title": name,
                "description": f"[{provided.cls.phase.value}] {provided.cls.summary()}",
                "properties": {name: {"anyOf": [params_schema, {"type": "null"}]}},
                "required": [name],
                "additionalProperties": False,
            }
        )
        items.append({"const": name, "title": name})
    schema["properties"]["chain"] = {
        "type": "array",
        "description": schema["properties"]["chain"].get("description", ""),
        "items": {"anyOf": items},
    }
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "pipeline-stage manifest"
    return schema
