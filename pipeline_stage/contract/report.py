"""The stage's report, typed: what one run measured, decided and registered.

``report.json`` is :class:`Report` dumped; ``pipeline-stage schema --report`` prints its JSON Schema.
The parts are frozen records, and they are what observer hooks receive (``after_step`` gets a
:class:`StepRecord`, ``after_gates`` a list of :class:`GateResult`, ``after_register`` a
:class:`Registered`), with an :class:`ObserverContext` that holds only what an observer needs.
Nothing here imports TensorFlow, MLflow or LiteRT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from pipeline_stage.contract.steps import Step


class Record(BaseModel):
    """A read-only part of the report. ``record["name"]`` still reads a field for this release, with
    a DeprecationWarning (observers written when the parts were plain dicts); it goes in 0.2.0:
    read ``record.name``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __getitem__(self, key: str) -> Any:
        import warnings

        warnings.warn(
            f'`record["{key}"]` is deprecated and goes in pipeline-stage 0.2.0: read `record.{key}`',
            DeprecationWarning,
            stacklevel=2,
        )
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None


class GateResult(Record):
    """The verdict of one gate on the candidate. All verdict strings come from here."""

    metric: str
    rule: str = Field(description="max_drop | max_relative_drop | min | max | max_ratio")
    threshold: float
    value: float | None = Field(description="The candidate's value of the metric.")
    baseline: float | None = Field(description="The baseline's value (None when it has none).")
    compared: float | None = Field(description="What the rule compared with the threshold (a drop, a ratio, or the value).")
    passed: bool
    worst_output: str | None = Field(
        None, description="For a metric measured per output of a multi-output model: the output whose value it is."
    )
    failing_outputs: list[str] = Field(
        default_factory=list,
        description="For a metric measured per output: the outputs whose own value fails the rule, worst first.",
    )
    tolerance: float | None = Field(
        None,
        description="For a timed metric: the spread across alternating rounds (in the metric's unit) the rule allowed.",
    )

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "fail"

    @property
    def label(self) -> str:
        """``accuracy max_drop 0.01``: which gate, in one line."""
        return f"{self.metric} {self.rule} {self.threshold:g}"

    def tag_text(self) -> str:
        """The value of the registered version's ``gate.<metric>.<rule>`` tag."""
        return f"{self.verdict} (value {_g(self.value)}, threshold {self.threshold:g})"

    def failure_text(self) -> str:
        """``accuracy max_drop 0.01 (value 0.96)``: a failed gate in the exit-3 message."""
        where = f", output `{self.worst_output}`" if self.worst_output else ""
        return f"{self.metric} {self.rule} {self.threshold} (value {_g(self.value)}{where})"


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


class StepRecord(Record):
    """What one step of the chain did: its params, the metrics measured after it, its notes."""

    name: str
    phase: str
    params: dict[str, Any]
    metrics: dict[str, float] = Field(default_factory=dict)
    seconds: float = 0.0
    notes: dict[str, Any] = Field(default_factory=dict, description="What the step reported (shown per step).")


def per_layer_errors(steps: "list[StepRecord] | tuple[StepRecord, ...]") -> list[dict[str, Any]]:
    """Per-layer quantization errors (worst first) that a step reported under ``notes["per_layer"]``
    (the convention analysis steps follow; the built-in ``analyze`` does), or []."""
    for step in steps:
        rows = step.notes.get("per_layer")
        if isinstance(rows, list):
            return rows
    return []


class ConversionRecord(Record):
    """The one conversion: the settings the chain's steps asked for, and what came out."""

    settings: dict[str, Any]
    seconds: float
    flatbuffer: dict[str, Any] = Field(description="Op counts and tensor types of the converted model.")


class FileDigest(Record):
    """One stored file, as recorded when it was registered (`pipeline-stage verify` compares with it)."""

    path: str = Field(description="model/<path in the logged model> or run/<path in the stage's run>.")
    sha256: str
    size: int = Field(description="Bytes.")


class Registered(Record):
    """The model version this run registered (or reused, for a retry of the same chain and source)."""

    name: str
    version: str
    alias: str | None = Field(description="The alias, when this version holds it now.")
    alias_holder: str | None = Field(description="The version that holds the alias after the alias rule was applied.")
    uri: str = Field(description="models:/name/N")
    reused: bool
    run_id: str | None
    model_uri: str | None = Field(description="The logged pyfunc model.")
    tflite_uri: str | None = Field(description="runs:/<run_id>/tflite/model.tflite")
    deduplicated: str | None = Field(
        None,
        description="The version this run registered and deleted again because an identical stage registered the "
        "same chain on the same source first (this run reports that one, reused).",
    )
    replaced: str | None = Field(
        None, description="An earlier identical version not reused because its stored files fail verification."
    )


class CompiledRecord(Record):
    """One accelerator target of the manifest's `compile` section: what its compiler took and made,
    and how the compiled model measured where this machine can run it."""

    target: str = Field(description="<compiler>/<soc>.")
    status: str = Field(
        description="compiled | rejected (the compiler refused the model) | failed (what it made does not run here): see `error`"
    )
    error: str | None = None
    partition: dict[str, Any] = Field(
        default_factory=dict, description="ops, offloaded, share (0..1), partitions, on_cpu (op -> count) of the main graph."
    )
    artifact: str | None = Field(None, description="The compiled file's path in the registered model.")
    size_bytes: int | None = None
    sha256: str | None = None
    stamp: dict[str, str] = Field(default_factory=dict, description="What the file says it is for (read back from it).")
    sdk: str | None = Field(None, description="The compiler SDK that made it.")
    evaluated: bool = Field(False, description="Whether the compiled model ran here on the evaluation data.")
    not_evaluated: str | None = Field(None, description="Why it was not evaluated here (it needs the device).")
    metrics: dict[str, float] = Field(default_factory=dict, description="The compiled model's metrics, measured here.")
    gates: list[GateResult] = Field(default_factory=list, description="The manifest's gates on what was measured here.")

    @property
    def key(self) -> str:
        """`<compiler>_<soc>`: the target in file names, tags and metric names."""
        return self.target.replace("/", "_")


class TimedComparison(Record):
    """A timed metric (latency), baseline and candidate timed side by side in alternating rounds."""

    metric: str
    rounds: int
    runs_per_round: int
    baseline: float = Field(description="The baseline's value over every round's invocations.")
    candidate: float = Field(description="The candidate's value over every round's invocations.")
    baseline_rounds: list[float] = Field(description="The baseline's value in each round.")
    candidate_rounds: list[float] = Field(description="The candidate's value in each round.")
    ratio: float | None = Field(description="candidate / baseline.")
    spread: float = Field(
        description="Half the range of (candidate - baseline) across rounds: the difference a gate does not count."
    )


class TrialRecord(Record):
    """One search trial: the chain it ran and what it scored."""

    index: int
    origin: str = Field(description="Why this chain was tried (the move that proposed it).")
    chain: str
    status: str = Field(description="passed | failed | error")
    metrics: dict[str, float] = Field(
        description="What the trial measured. A timed metric (latency) is its ratio to the baseline timed beside it "
        "(see `timed`), times the baseline's value in the stage: one scale for trials timed at different moments."
    )
    shortfall: float | None = Field(description="Sum of the failed gates' relative misses (0 when it passed).")
    failed_gates: list[str]
    seconds: float
    error: str | None
    run_id: str | None = Field(description="The trial's nested MLflow run.")
    timed: list[TimedComparison] = Field(
        default_factory=list,
        description="Timed metrics: the trial's candidate and the baseline in alternating rounds in its worker; its gates "
        "use these values and their spread.",
    )
    evaluation_notes: list[str] = Field(
        default_factory=list, description="What its evaluation had to do otherwise (a batch retried smaller)."
    )


class SearchSummary(Record):
    """What the search tried, and why the winner won (or which trial came closest)."""

    strategy: str
    objective: list[str]
    parallel: int
    budget: dict[str, Any]
    stopped_because: str
    seconds: float
    winner: int | None
    closest: int | None
    why: str
    chain: str
    trials: list[TrialRecord]
    not_tried: list[dict[str, str]] = Field(
        default_factory=list,
        description="What the auto search's alternative moves proposed but never ran, each {move, origin, reason}.",
    )
    as_written_per_layer: list[dict[str, Any]] = Field(description="Per-layer error of the first trial, worst first.")
    paths: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Each refinement path of the auto search: the move, the trial it started from, the trials it took, "
        "the shortfall it closed per trial and why it stopped.",
    )


class ManifestRef(Record):
    path: str
    chain_digest: str
    sha256: str


class SourceRef(Record):
    """Lineage of the source model (also tags of the registered version)."""

    uri: str
    name: str | None = None
    version: str | None = None
    run_id: str | None = None
    kind: str | None = Field(None, description="The model source plugin that opened it (keras, saved_model, tflite, ...).")

    def tags(self) -> dict[str, str]:
        out = {"source.uri": self.uri}
        for key in ("name", "version", "run_id"):
            value = getattr(self, key)
            if value:
                out[f"source.{key}"] = str(value)
        return out


class Timing(Record):
    """Where a run's wall time went, by phase (seconds; a phase the run did not reach is absent)."""

    convert_and_evaluate_s: float | None = Field(
        None, description="From the baseline's conversion to the candidate's evaluation."
    )
    startup_s: float | None = Field(None, description="From the process start to the run's start: Python, imports, the CLI.")
    resolve_s: float | None = Field(None, description="Tracking preflight, resolving the model URI, starting the MLflow run.")
    model_download_s: float | None = Field(None, description="Downloading the source model.")
    load_s: float | None = Field(None, description="Loading the model; downloading and loading the data.")
    baseline_s: float | None = Field(None, description="The baseline: float conversion and its measurements.")
    chain_s: float | None = Field(None, description="The chain (or the search); per step in `steps[].seconds`.")
    evaluate_s: float | None = Field(None, description="The candidate's measurements and the gates.")
    compile_s: float | None = Field(None, description="Compiling for accelerator targets, and evaluating what runs here.")
    register_s: float | None = Field(None, description="Uploading the .tflite, logging the pyfunc, the version and the alias.")
    reports_s: float | None = Field(None, description="Rendering report.json / .md / .html and logging them.")
    total_s: float | None = Field(None, description="The whole run, from the process start.")
    peak_rss_mb: float | None = Field(
        None, description="Peak resident memory of the stage's own process, MB (search workers and other children not included)."
    )

    def rows(self) -> list[tuple[str, float]]:
        """(phase, seconds) in the order a run goes, for the reports; the phases the run reached."""
        order = (
            "startup",
            "resolve",
            "model_download",
            "load",
            "baseline",
            "chain",
            "evaluate",
            "compile",
            "register",
            "reports",
            "total",
        )
        return [(name.replace("_", " "), value) for name in order if (value := getattr(self, f"{name}_s")) is not None]


class Report(BaseModel):
    """Everything one run of the stage measured and decided. Fields a run did not reach are absent
    from report.json (a run that failed early has no ``candidate``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    passed: bool = False
    manifest: ManifestRef
    source: SourceRef
    tracking_uri: str
    package_version: str
    run_id: str | None = None
    ended_orphans: list[str] = Field(
        default_factory=list,
        description="Runs of the same chain on the same source that an outage had left RUNNING, ended FAILED by this run.",
    )
    baseline: dict[str, float] = Field(
        default_factory=dict, description="Prediction metrics of the source model, flatbuffer metrics of its float conversion."
    )
    baseline_tflite: dict[str, float] = Field(default_factory=dict, description="Every metric of the float TFLite conversion.")
    baseline_flatbuffer: dict[str, Any] = Field(default_factory=dict)
    baseline_seconds: float | None = None
    search: SearchSummary | None = None
    conversion: ConversionRecord | None = None
    steps: list[StepRecord] = Field(default_factory=list)
    candidate: dict[str, float] | None = Field(None, description="Every metric of the optimized model.")
    gates: list[GateResult] = Field(default_factory=list)
    timed: list[TimedComparison] = Field(
        default_factory=list, description="Latency-like metrics, baseline and candidate timed in alternating rounds."
    )
    compiled: list[CompiledRecord] = Field(
        default_factory=list, description="Per accelerator target of `compile`: compiled or rejected, coverage, fidelity."
    )
    registered: Registered | None = None
    artifacts: list[FileDigest] = Field(
        default_factory=list,
        description="sha256 and size of every file the run stored: the run's .tflite and the logged model's files.",
    )
    timing: Timing | None = None
    seconds: float | None = None
    error: str | None = None
    evaluation_notes: list[str] = Field(
        default_factory=list,
        description="What evaluating had to do otherwise: a batch the model could not take whole, retried in halves.",
    )
    source_notes: list[str] = Field(
        default_factory=list,
        description="How the source model was read: what its plugin rewrote for the engines (exactly), how the model "
        "is fed, what was carried into the registered file.",
    )

    def compared_baseline(self) -> dict[str, float]:
        """What the candidate's values are compared with (gates, tables): the baseline's values, a
        timed metric's being the baseline timed beside the candidate (`timed`), not alone."""
        return {**self.baseline, **{t.metric: t.baseline for t in self.timed}}

    def to_json_data(self) -> dict[str, Any]:
        """The JSON document: every field the run set, in schema order."""
        data = self.model_dump(mode="python")
        return {k: v for k, v in data.items() if k in self.model_fields_set or k == "passed"}

    def failure_message(self) -> str:
        """The one line that says why nothing was promoted (the CLI's exit-3 message)."""
        failed = "; ".join(
            [g.failure_text() for g in self.gates if not g.passed]
            + [f"{c.target}: {g.failure_text()}" for c in self.compiled for g in c.gates if not g.passed]
        )
        reg = self.registered
        tail = f"; registered {reg.uri} tagged failed, no alias" if reg else "; nothing registered"
        return "gate failed: " + failed + tail


@dataclass(frozen=True)
class ObserverContext:
    """What observer hooks see of a run: read-only, and only what watching a run needs."""

    manifest_path: str
    chain_digest: str
    steps: tuple["Step", ...]
    run_id: str | None
    quiet: bool
    progress: Callable[[str], Callable[[str], None]] | None = field(default=None, repr=False, compare=False)

    def log(self, label: str, message: str) -> None:
        """A progress line on the stage's one stderr channel (plain `[label] message` lines in a pod's
        log, coloured on a terminal); nothing when the run is quiet."""
        if self.progress is not None and not self.quiet:
            self.progress(label)(message)
