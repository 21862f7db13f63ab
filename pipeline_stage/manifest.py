"""The manifest: one YAML file, checked whole before any heavy work starts.

Everything a run needs is validated here, without TensorFlow: YAML syntax, field names and
types (with did-you-mean for unknown keys), step names against the installed plugins, each step's
params against its own schema, the chain's phase order, metric names, which data sets the chain
needs, and the shape of every URI. Errors name the file, the line and the field.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline_stage.errors import ManifestError
from pipeline_stage.plugins import Registry
from pipeline_stage.steps import Phase, Step

GATE_RULES = ("max_drop", "max_relative_drop", "min", "max", "max_ratio")
DATA_SETS = ("calibration", "evaluation", "training")
# MLflow registered-model names: printable, no slashes or colons (they break models:/ URIs).
MODEL_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.\- ]{0,255}$"
ALIAS_RE = r"^[A-Za-z_][A-Za-z0-9_\-]{0,255}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(_Strict):
    """Where the data comes from: any URI MLflow can download (runs:/, models:/, paths, stores)."""

    calibration: str | None = Field(None, description="Representative inputs for int8 calibration (`x`).")
    evaluation: str | None = Field(None, description="Labelled held-out data for metrics and gates (`x`, `y`).")
    training: str | None = Field(None, description="Labelled data for fine-tuning steps (`x`, `y`).")


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
    threads: int | None = Field(None, ge=1, le=256, description="Interpreter threads for accuracy evaluation (default: all cores).")
    latency_runs: int = Field(100, ge=5, le=100000, description="Invocations for latency (batch 1, 1 thread, XNNPACK).")


class Gate(_Strict):
    """One rule on one metric; the candidate must satisfy it or nothing is promoted."""

    metric: str = Field(description="A registered metric, e.g. accuracy, size_bytes, latency_p50_ms.")
    max_drop: float | None = Field(None, ge=0, description="Largest allowed drop vs the baseline (an increase for lower-is-better metrics).")
    max_relative_drop: float | None = Field(None, ge=0, le=1, description="Largest allowed drop as a fraction of the baseline.")
    min: float | None = Field(None, description="Smallest allowed candidate value.")
    max: float | None = Field(None, description="Largest allowed candidate value.")
    max_ratio: float | None = Field(None, gt=0, description="Largest allowed candidate / baseline ratio.")

    @model_validator(mode="after")
    def _one_rule(self) -> "Gate":
        given = [r for r in GATE_RULES if getattr(self, r) is not None]
        if len(given) != 1:
            found = ", ".join(given) if given else "none"
            raise ValueError(f"a gate takes exactly one rule of {', '.join(GATE_RULES)} (found: {found}); write one gate per rule")
        return self

    @property
    def rule(self) -> str:
        return next(r for r in GATE_RULES if getattr(self, r) is not None)

    @property
    def threshold(self) -> float:
        return float(getattr(self, self.rule))


class RegisterSpec(_Strict):
    """Where the optimized model goes in the MLflow Model Registry."""

    name: str = Field(pattern=MODEL_NAME_RE, description="Registered model name (created if missing).")
    alias: str | None = Field(None, pattern=ALIAS_RE, description="Alias moved to the new version only when every gate passes.")
    on_failure: Literal["skip", "register"] = Field(
        "skip", description="On a failed gate: `skip` registers nothing; `register` registers the version tagged as failed, never aliased."
    )
    tags: dict[str, str] = Field(default_factory=dict, description="Extra tags for the new version.")
    priority: int = Field(0, description="Rank of this chain for the alias: the alias goes to the newest passing version "
                                         "of the highest-priority chain registered for it (so concurrent stages agree).")


class ConversionSpec(_Strict):
    """Converter options that are the manifest author's call, not a step's."""

    allow_select_tf_ops: bool = Field(False, description="Let ops without a TFLite builtin run as TF Select ops (needs the Flex delegate at run time).")
    allow_custom_ops: bool = Field(False, description="Keep unknown ops as custom ops (the runtime must provide them).")


class SearchBudget(_Strict):
    """When the search stops trying."""

    trials: int = Field(12, ge=1, le=1000, description="Most trials (each a full chain run in a child process).")
    seconds: float = Field(900, gt=0, description="Wall-clock budget of the search; no trial starts after it.")


class SearchSpec(_Strict):
    """Accuracy-aware search: when the chain as written may fail its gates, try alternatives."""

    strategy: Literal["candidates", "auto"] = Field(description=(
        "candidates: try the chain and the listed alternative chains (cheapest first); auto: start from the chain "
        "(which must quantize to int8) and try fuse, the other engine, and keeping the worst op types / nodes in float."))
    objective: list[str] = Field(default_factory=lambda: ["latency_p50_ms", "size_bytes"], min_length=1, description=(
        "Metrics that rank passing trials, most important first (each in its own good direction)."))
    candidates: list[list[Any]] = Field(default_factory=list, description="strategy candidates: alternative chains, each a list of steps.")
    stop_at_first_pass: bool = Field(False, description="candidates: stop at the first passing chain in cost order instead of trying all.")
    moves: list[Literal["fuse", "engine", "keep_float_ops", "keep_float_nodes"]] = Field(
        default_factory=lambda: ["fuse", "engine", "keep_float_ops", "keep_float_nodes"], description="auto: the moves it may make.")
    max_float_nodes: int = Field(8, ge=1, le=1000, description="auto: most nodes kept in float.")
    budget: SearchBudget = Field(default_factory=SearchBudget)
    parallel: int | None = Field(None, ge=1, le=256, description="Trials run at once (default: the machine's cores).")
    tie_tolerance: float = Field(0.05, ge=0, lt=1, description=(
        "Objective values within this relative distance count as equal (timings are noisy), so the next objective decides."))
    seed: int = Field(0, description="Seed for every trial's fine-tuning steps; the same inputs and seed give the same search.")


class Manifest(_Strict):
    """A pipeline-stage manifest."""

    model: str | None = Field(None, description="models:/name@alias, models:/name/N, runs:/<id>/path, or a local .keras/SavedModel path. `--model-uri` overrides it.")
    data: DataSpec = Field(default_factory=DataSpec)
    chain: list[Any] = Field(description="Ordered steps; each item is `step_name: {params}` (or just `step_name`).")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    gates: list[Gate] = Field(default_factory=list)
    # `register` is a BaseModel attribute name, hence the alias.
    registration: RegisterSpec | None = Field(None, alias="register", description="Where the result is registered; omit to only evaluate.")
    conversion: ConversionSpec = Field(default_factory=ConversionSpec)
    search: SearchSpec | None = Field(None, description="Search for a chain that passes the gates (see the README's Search section).")
    experiment: str = Field("pipeline-stage", min_length=1, description="MLflow experiment of the stage's runs.")
    allow_unsafe_deserialization: bool = Field(
        False, description="Load Keras models with safe_mode off (runs Lambda layers' code). Only for models you trust.")

    @field_validator("model")
    @classmethod
    def _model_uri(cls, value: str | None) -> str | None:
        if value is not None:
            check_model_uri(value)
        return value


@dataclass
class LoadedManifest:
    """A validated manifest with its configured steps."""

    path: str
    manifest: Manifest
    steps: list[Step]
    raw: dict[str, Any]
    text: str
    lines: dict[tuple, int]
    candidates: list[list[Step]] = dc_field(default_factory=list)  # search.candidates, configured

    @property
    def chain_digest(self) -> str:
        """Digest of the chain as it will run (names and params with defaults filled in)."""
        chain: Any = [[s.name, s.params.model_dump(mode="json")] for s in self.steps]
        if self.manifest.search is not None:  # a search may register another chain: its whole spec counts
            chain = {"chain": chain, "search": self.manifest.search.model_dump(mode="json", exclude={"candidates"}),
                     "candidates": [[[s.name, s.params.model_dump(mode="json")] for s in c] for c in self.candidates]}
        return hashlib.sha256(json.dumps(chain, sort_keys=True).encode()).hexdigest()[:16]

    def required_data(self, registry: Registry) -> set[str]:
        needed: set[str] = set()
        for step in [*self.steps, *(s for chain in self.candidates for s in chain)]:
            needed |= step.required_data()
        for name in self.metric_names() + list(self.manifest.evaluation.per_step):
            provided = registry.metrics.get(name)
            if provided is not None and provided.cls.needs_labels:
                needed.add("evaluation")
        return needed

    def metric_names(self) -> list[str]:
        names = self.manifest.evaluation.metrics
        if names is None:
            names = (["accuracy"] if self.manifest.data.evaluation else []) + ["size_bytes", "latency_p50_ms"]
        names = list(names)
        extra = [g.metric for g in self.manifest.gates] + (self.manifest.search.objective if self.manifest.search else [])
        for name in extra:
            if name not in names:
                names.append(name)
        return names


def check_model_uri(uri: str) -> None:
    """Raise ValueError for a model URI that can never resolve."""
    if uri.startswith("models:/"):
        rest = uri[len("models:/"):]
        if not (re.fullmatch(r"[^/@]+@[A-Za-z_][\w\-]*", rest) or re.fullmatch(r"[^/@]+/(\d+|latest)", rest)
                or re.fullmatch(r"m-[0-9a-f]+", rest)):
            raise ValueError(f"`{uri}` is not a model registry URI: use models:/<name>@<alias> or models:/<name>/<version>")
    elif uri.startswith("runs:/"):
        if not re.fullmatch(r"runs:/[0-9a-zA-Z_\-]+/.+", uri) and not re.fullmatch(r"runs:/[0-9a-zA-Z_\-]+/?", uri):
            raise ValueError(f"`{uri}` is not a run URI: use runs:/<run_id>/<artifact path>")
    elif not uri.strip():
        raise ValueError("the model URI is empty")


def _line_map(text: str) -> dict[tuple, int]:
    """Map every key path of the YAML document to its (1-based) line."""
    lines: dict[tuple, int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines

    def walk(node: Any, path: tuple) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = path + (key.value,)
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)
                lines[sub] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (i,))

    if root is not None:
        walk(root, ())
    return lines


class _NoDuplicatesLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _NoDuplicatesLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key `{key}`", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_NoDuplicatesLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _fmt_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line_for(lines: dict[tuple, int], loc: tuple) -> int | None:
    loc = tuple(loc)
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get(())


def _did_you_mean(word: str, options: list[str]) -> str | None:
    close = difflib.get_close_matches(str(word), options, n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else None


def _pydantic_error(exc: ValidationError, model: type[BaseModel], path: str, lines: dict, prefix: tuple = (),
                    what: str = "") -> ManifestError:
    err = exc.errors()[0]
    loc = prefix + tuple(err["loc"])
    field = _fmt_loc(loc)
    line = _line_for(lines, loc)
    more = len(exc.errors()) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    if err["type"] == "extra_forbidden":
        owner: Any = model
        for part in err["loc"][:-1]:
            fld = getattr(owner, "model_fields", {}).get(part)
            ann = getattr(fld, "annotation", None) if fld else None
            owner = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
            if owner is None:
                break
        options = list(getattr(owner, "model_fields", {}))
        hint = _did_you_mean(err["loc"][-1], options) or (f"known fields: {', '.join(options)}" if options else None)
        return ManifestError(f"unknown field{what}{tail}", path=path, line=line, field=field, hint=hint)
    found = err.get("input")
    found_txt = f" (found {found!r})" if not isinstance(found, (dict, list)) and err["type"] != "missing" else ""
    return ManifestError(f"{err['msg']}{what}{found_txt}{tail}", path=path, line=line, field=field)


def parse_chain_item(item: Any) -> tuple[str, Any]:
    if isinstance(item, str):
        return item, None
    if isinstance(item, dict) and len(item) == 1:
        name, params = next(iter(item.items()))
        if isinstance(name, str):
            return name, params
    raise ValueError("each chain item is `step_name: {params}` (a mapping with one key) or a bare step name")


def load_manifest(path: str | Path, registry: Registry, *, model_uri: str | None = None) -> LoadedManifest:
    """Read, parse and validate a manifest file; raise ManifestError naming file, line and field."""
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError("file not found", path=path, hint="check the path of the manifest") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read the file: {exc}", path=path) from None
    return parse_manifest(text, registry, path=path, model_uri=model_uri)


MAX_NODES = 100_000  # after expanding YAML aliases; a real manifest has a few hundred


def _expanded_size(node: Any, memo: dict[int, int]) -> int:
    """Node count once aliases are expanded (a "billion laughs" document is tiny but explodes)."""
    key = id(node)
    if key not in memo:
        if isinstance(node, yaml.MappingNode):
            memo[key] = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            memo[key] = 1 + sum(_expanded_size(v, memo) for v in node.value)
        else:
            memo[key] = 1
    return memo[key]


def parse_manifest(text: str, registry: Registry, *, path: str = "<manifest>", model_uri: str | None = None) -> LoadedManifest:
    """Validate manifest text (see :func:`load_manifest`)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None and _expanded_size(root, {}) > MAX_NODES:
            raise ManifestError(f"the document expands to more than {MAX_NODES:,} values (YAML aliases)", path=path,
                                hint="write the manifest out without nested anchors and aliases")
        raw = yaml.load(text, Loader=_NoDuplicatesLoader)  # a SafeLoader: no Python objects from YAML
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ManifestError(f"invalid YAML: {problem}", path=path, line=mark.line + 1 if mark else None,
                            hint="check indentation, colons and quotes on that line") from None
    except RecursionError:
        raise ManifestError("invalid YAML: nested too deeply", path=path) from None
    lines = _line_map(text)
    if raw is None:
        raise ManifestError("the manifest is empty", path=path, hint="start from manifests/examples/digits-int8.yaml")
    if not isinstance(raw, dict):
        raise ManifestError(f"the manifest must be a mapping of fields, found a {type(raw).__name__}", path=path, line=1)
    for key in raw:
        if not isinstance(key, str):
            raise ManifestError(f"field names must be strings, found {key!r}", path=path, line=_line_for(lines, (key,)))
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise _pydantic_error(exc, Manifest, path, lines) from None
    if model_uri is not None:
        try:
            check_model_uri(model_uri)
        except ValueError as exc:
            raise ManifestError(str(exc), path=path, field="--model-uri") from None
        manifest.model = model_uri
    if manifest.model is None:
        raise ManifestError("no model given", path=path, field="model",
                            hint="set `model: models:/<name>@<alias>` in the manifest or pass --model-uri")

    steps = parse_steps(manifest.chain, registry, path=path, lines=lines, loc=("chain",))
    known_metrics = sorted(registry.metrics)

    def check_metric(name: str, loc: tuple) -> None:
        if name not in registry.metrics:
            raise ManifestError(f"unknown metric `{name}`; installed metrics: {', '.join(known_metrics)}", path=path,
                                line=_line_for(lines, loc), field=_fmt_loc(loc), hint=_did_you_mean(name, known_metrics))

    candidates = []
    if manifest.search is not None:
        search = manifest.search
        if search.strategy == "candidates" and not search.candidates:
            raise ManifestError("strategy `candidates` needs at least one chain under `search.candidates`", path=path,
                                line=_line_for(lines, ("search", "strategy")), field="search.candidates",
                                hint="add `candidates: [[{fuse: {}}, {quantize: {mode: int8}}], ...]`, or use strategy auto")
        if search.strategy == "auto":
            quant = [st for st in steps if st.name == "quantize"]
            if not quant or getattr(quant[0].params, "mode", None) != "int8":
                raise ManifestError("strategy `auto` searches around full-int8 quantization: the chain needs `quantize: {mode: int8}`",
                                    path=path, line=_line_for(lines, ("search", "strategy")), field="search.strategy",
                                    hint="add `- quantize: {mode: int8}` to the chain, or use strategy candidates")
            if not manifest.gates:
                raise ManifestError("strategy `auto` searches until the gates pass, but there are no gates", path=path,
                                    line=_line_for(lines, ("search",)), field="gates", hint="add e.g. `- {metric: accuracy, max_drop: 0.01}`")
        for k, chain in enumerate(search.candidates):
            candidates.append(parse_steps(chain, registry, path=path, lines=lines, loc=("search", "candidates", k)))
        for j, name in enumerate(search.objective):
            check_metric(name, ("search", "objective", j))

    for key, names in (("metrics", manifest.evaluation.metrics or []), ("per_step", manifest.evaluation.per_step)):
        for j, name in enumerate(names):
            check_metric(name, ("evaluation", key, j))
    for j, gate in enumerate(manifest.gates):
        check_metric(gate.metric, ("gates", j, "metric"))

    loaded = LoadedManifest(path=path, manifest=manifest, steps=steps, raw=raw, text=text, lines=lines, candidates=candidates)
    for data_set in sorted(loaded.required_data(registry)):
        if getattr(manifest.data, data_set) is None:
            users = [s.name for s in steps if data_set in s.required_data()] or ["the metrics and gates"]
            raise ManifestError(
                f"`{data_set}` data is required by {', '.join(users)} but not given", path=path,
                line=_line_for(lines, ("data",)), field=f"data.{data_set}",
                hint=f"add `data: {{{data_set}: <URI of an .npz with arrays x and y>}}`",
            )
    if manifest.registration is not None and manifest.registration.alias and not manifest.gates:
        # Moving an alias with no gate would promote anything; require the author to say so.
        raise ManifestError("`register.alias` is set but there are no gates to decide when to move it",
                            path=path, line=_line_for(lines, ("register", "alias")), field="register.alias",
                            hint="add at least one gate, e.g. `- {metric: accuracy, max_drop: 0.01}`")
    return loaded


def parse_steps(items: list[Any], registry: Registry, *, path: str, lines: dict, loc: tuple) -> list[Step]:
    """Configured steps of one chain (the manifest's, or a search candidate), in a valid phase order."""
    steps: list[Step] = []
    known = sorted(registry.steps)
    where = _fmt_loc(loc)
    for i, item in enumerate(items):
        item_loc = loc + (i,)
        try:
            name, params = parse_chain_item(item)
        except ValueError as exc:
            raise ManifestError(str(exc), path=path, line=_line_for(lines, item_loc), field=_fmt_loc(item_loc)) from None
        provided = registry.steps.get(name)
        if provided is None:
            hint = _did_you_mean(name, known)
            raise ManifestError(f"unknown step `{name}`; installed steps: {', '.join(known)}", path=path,
                                line=_line_for(lines, item_loc), field=_fmt_loc(item_loc),
                                hint=hint or "install the plugin that provides it (`pipeline-stage plugins` lists what is installed)")
        cls = provided.cls
        if params is not None and not isinstance(params, dict):
            raise ManifestError(f"params of step `{name}` must be a mapping, found {type(params).__name__}",
                                path=path, line=_line_for(lines, item_loc + (name,)), field=_fmt_loc(item_loc + (name,)))
        try:
            step_params = cls.Params.model_validate(params or {})
        except ValidationError as exc:
            raise _pydantic_error(exc, cls.Params, path, lines, prefix=item_loc + (name,),
                                  what=f" for step `{name}`") from None
        try:
            steps.append(cls(step_params))
        except Exception as exc:
            raise ManifestError(f"step `{name}` rejected its params: {exc}", path=path,
                                line=_line_for(lines, item_loc + (name,)), field=_fmt_loc(item_loc + (name,))) from None

    for i in range(1, len(steps)):
        prev, cur = steps[i - 1], steps[i]
        if cur.phase.order < prev.phase.order:
            raise ManifestError(
                f"step `{cur.name}` (phase {cur.phase.value}) comes after `{prev.name}` (phase {prev.phase.value})",
                path=path, line=_line_for(lines, loc + (i,)), field=f"{where}[{i}]",
                hint=f"order the chain by phase: {' -> '.join(p.value for p in Phase)}; move `{cur.name}` before `{prev.name}`",
            )
    return steps


def manifest_json_schema(registry: Registry) -> dict[str, Any]:
    """JSON Schema of the manifest, with each installed step's params (for editor completion)."""
    schema = Manifest.model_json_schema()
    items = []
    for name, provided in sorted(registry.steps.items()):
        params_schema = provided.cls.Params.model_json_schema()
        defs = params_schema.pop("$defs", {})
        schema.setdefault("$defs", {}).update(defs)
        params_schema.setdefault("description", provided.cls.summary())
        items.append({
            "type": "object",
            "title": name,
            "description": f"[{provided.cls.phase.value}] {provided.cls.summary()}",
            "properties": {name: {"anyOf": [params_schema, {"type": "null"}]}},
            "required": [name],
            "additionalProperties": False,
        })
        items.append({"const": name, "title": name})
    schema["properties"]["chain"] = {"type": "array", "description": schema["properties"]["chain"].get("description", ""),
                                     "items": {"anyOf": items}}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "pipeline-stage manifest"
    return schema
