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
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline_stage.contract.errors import ManifestError
from pipeline_stage.contract.steps import Phase, Step
from pipeline_stage.host.plugin_host import PluginHost
from pipeline_stage.manifest.data_checks import check_inputs_for_metrics
from pipeline_stage.manifest.schema import Manifest, check_model_uri
from pipeline_stage.manifest.yaml_text import MAX_NODES, NoDuplicatesLoader, expanded_size, fmt_loc, line_for, line_map


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
    moves: list[str] = dc_field(default_factory=list)  # the search moves it may use, by name (all installed by default)

    @property
    def chain_digest(self) -> str:
        """Digest of the chain as it will run (names and params with defaults filled in)."""
        chain: Any = [[s.name, s.params.model_dump(mode="json")] for s in self.steps]
        if self.manifest.search is not None:  # a search may register another chain: its whole spec counts
            search = self.manifest.search.model_dump(mode="json", exclude={"candidates"})
            search["moves"] = self.moves  # what it may do, whether written or by default
            chain = {
                "chain": chain,
                "search": search,
                "candidates": [[[s.name, s.params.model_dump(mode="json")] for s in c] for c in self.candidates],
            }
        if self.manifest.signature != "serving_default":  # another signature is another model
            chain = {"chain": chain, "signature": self.manifest.signature}
        return hashlib.sha256(json.dumps(chain, sort_keys=True).encode()).hexdigest()[:16]

    def required_data(self, host: PluginHost) -> set[str]:
        """The data sets the steps need, and `evaluation` for metrics computed on predictions."""
        needed: set[str] = set()
        for step in [*self.steps, *(s for chain in self.candidates for s in chain)]:
            needed |= step.required_data()
        for name in self.metric_names() + list(self.manifest.evaluation.per_step):
            found = host.metric_for(name)
            if found is not None and (found[0].cls.needs_labels or found[0].cls.uses == "predictions"):
                needed.add("evaluation")
        return needed

    def measured_names(self) -> list[str]:
        """Every metric a run may measure (per step too); a default list asks for accuracy only when
        the data turns out to have labels, so it is left out here."""
        return self.metric_names(labels=False) + list(self.manifest.evaluation.per_step)

    def needing_labels(self, host: PluginHost) -> list[str]:
        """The measured metrics that need the evaluation data's labels."""
        return [n for n in self.measured_names() if host.metric_class(n).needs_labels]

    def metric_names(self, *, labels: bool = True) -> list[str]:
        """The metrics measured for baseline and candidate: the manifest's list (default: accuracy when
        the evaluation data has labels, fidelity to the baseline when there is evaluation data, size,
        and latency when there is any data to time the model on), plus every gated and objective metric."""
        names = self.manifest.evaluation.metrics
        if names is None:
            data = self.manifest.data
            names = (["accuracy"] if data.evaluation and labels else []) + (["fidelity_sqnr_db"] if data.evaluation else [])
            names += ["size_bytes"] + (["latency_p50_ms"] if data.evaluation or data.calibration or data.training else [])
        names = list(names)
        extra = [g.metric for g in self.manifest.gates] + (self.manifest.search.objective if self.manifest.search else [])
        for name in extra:
            if name not in names:
                names.append(name)
        return names


def _did_you_mean(word: str, options: list[str]) -> str | None:
    close = difflib.get_close_matches(str(word), options, n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else None


def _pydantic_error(
    exc: ValidationError, model: type[BaseModel], path: str, lines: dict, prefix: tuple = (), what: str = ""
) -> ManifestError:
    err = exc.errors()[0]
    loc = prefix + tuple(err["loc"])
    field = fmt_loc(loc)
    line = line_for(lines, loc)
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


def load_manifest(path: str | Path, host: PluginHost, *, model_uri: str | None = None, read_data: bool = False) -> LoadedManifest:
    """Read, parse and validate a manifest file; raise ManifestError naming file, line and field.

    `read_data` also reads a local evaluation file to refuse metrics that need labels it lacks
    (`validate` does; a run checks when it loads the data, so it reads the file once).
    """
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError("file not found", path=path, hint="check the path of the manifest") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read the file: {exc}", path=path) from None
    return parse_manifest(text, host, path=path, model_uri=model_uri, read_data=read_data)


def parse_manifest(
    text: str, host: PluginHost, *, path: str = "<manifest>", model_uri: str | None = None, read_data: bool = False
) -> LoadedManifest:
    """Validate manifest text (see :func:`load_manifest`)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None and expanded_size(root, {}) > MAX_NODES:
            raise ManifestError(
                f"the document expands to more than {MAX_NODES:,} values (YAML aliases)",
                path=path,
                hint="write the manifest out without nested anchors and aliases",
            )
        raw = yaml.load(text, Loader=NoDuplicatesLoader)  # a SafeLoader: no Python objects from YAML
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ManifestError(
            f"invalid YAML: {problem}",
            path=path,
            line=mark.line + 1 if mark else None,
            hint="check indentation, colons and quotes on that line",
        ) from None
    except RecursionError:
        raise ManifestError("invalid YAML: nested too deeply", path=path) from None
    lines = line_map(text)
    if raw is None:
        raise ManifestError("the manifest is empty", path=path, hint="start from manifests/examples/digits-int8.yaml")
    if not isinstance(raw, dict):
        raise ManifestError(f"the manifest must be a mapping of fields, found a {type(raw).__name__}", path=path, line=1)
    for key in raw:
        if not isinstance(key, str):
            raise ManifestError(f"field names must be strings, found {key!r}", path=path, line=line_for(lines, (key,)))
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
        raise ManifestError(
            "no model given",
            path=path,
            field="model",
            hint="set `model: models:/<name>@<alias>` in the manifest or pass --model-uri",
        )

    steps = parse_steps(manifest.chain, host, path=path, lines=lines, loc=("chain",))
    known_metrics = sorted(host.metrics)

    def check_metric(name: str, loc: tuple) -> None:
        if host.metric_for(name) is None:
            raise ManifestError(
                f"unknown metric `{name}`; installed metrics: {', '.join(known_metrics)}",
                path=path,
                line=line_for(lines, loc),
                field=fmt_loc(loc),
                hint=_did_you_mean(name, known_metrics),
            )

    candidates: list[list[Step]] = []
    moves: list[str] = []
    if manifest.search is not None:
        search = manifest.search
        if search.strategy == "candidates" and not search.candidates:
            raise ManifestError(
                "strategy `candidates` needs at least one chain under `search.candidates`",
                path=path,
                line=line_for(lines, ("search", "strategy")),
                field="search.candidates",
                hint="add `candidates: [[{fuse: {}}, {quantize: {mode: int8}}], ...]`, or use strategy auto",
            )
        moves = _search_moves(search.moves, host, path=path, lines=lines)
        if search.strategy == "auto":
            as_written = [(name, dict(params or {})) for name, params in map(parse_chain_item, manifest.chain)]
            usable = [host.moves[n].cls for n in moves if host.moves[n].cls().applies(as_written)]
            if not usable:
                needs = "; ".join(f"`{n}` needs {host.moves[n].cls.requirement or 'another chain'}" for n in moves)
                raise ManifestError(
                    f"strategy `auto` has no search move for this chain ({needs or 'no moves installed'})",
                    path=path,
                    line=line_for(lines, ("search", "strategy")),
                    field="search.strategy",
                    hint="change the chain so that a move applies (e.g. `- quantize: {mode: int8}`), or use strategy candidates",
                )
            if not manifest.gates:
                raise ManifestError(
                    "strategy `auto` searches until the gates pass, but there are no gates",
                    path=path,
                    line=line_for(lines, ("search",)),
                    field="gates",
                    hint="add e.g. `- {metric: accuracy, max_drop: 0.01}`",
                )
        for k, chain in enumerate(search.candidates):
            candidates.append(parse_steps(chain, host, path=path, lines=lines, loc=("search", "candidates", k)))
        for j, name in enumerate(search.objective):
            check_metric(name, ("search", "objective", j))

    for key, names in (("metrics", manifest.evaluation.metrics or []), ("per_step", manifest.evaluation.per_step)):
        for j, name in enumerate(names):
            check_metric(name, ("evaluation", key, j))
    for j, gate in enumerate(manifest.gates):
        check_metric(gate.metric, ("gates", j, "metric"))

    loaded = LoadedManifest(
        path=path,
        manifest=manifest,
        steps=steps,
        raw=raw,
        text=text,
        lines=lines,
        candidates=candidates,
        moves=moves if manifest.search is not None else [],
    )
    for data_set in sorted(loaded.required_data(host)):
        if getattr(manifest.data, data_set) is None:
            users = [s.name for s in steps if data_set in s.required_data()] or ["the metrics and gates"]
            raise ManifestError(
                f"`{data_set}` data is required by {', '.join(users)} but not given",
                path=path,
                line=line_for(lines, ("data",)),
                field=f"data.{data_set}",
                hint=f"add `data: {{{data_set}: <URI of an .npz with arrays x and y>}}`",
            )
    check_inputs_for_metrics(loaded, host, read_data=read_data)
    if manifest.registration is not None and manifest.registration.alias and not manifest.gates:
        # Moving an alias with no gate would promote anything; require the author to say so.
        raise ManifestError(
            "`register.alias` is set but there are no gates to decide when to move it",
            path=path,
            line=line_for(lines, ("register", "alias")),
            field="register.alias",
            hint="add at least one gate, e.g. `- {metric: accuracy, max_drop: 0.01}`",
        )
    return loaded


def _search_moves(names: list[str] | None, host: PluginHost, *, path: str, lines: dict) -> list[str]:
    """The search moves a manifest picks (all installed ones when it names none), each one known."""
    if names is None:
        return list(host.moves)
    known = list(host.moves)
    for j, name in enumerate(names):
        if name not in host.moves:
            loc = ("search", "moves", j)
            raise ManifestError(
                f"unknown search move `{name}`; installed moves: {', '.join(known) or 'none'}",
                path=path,
                line=line_for(lines, loc),
                field=fmt_loc(loc),
                hint=_did_you_mean(name, known) or "install the plugin that provides it (`pipeline-stage plugins` lists them)",
            )
    return list(names)


def parse_steps(items: list[Any], host: PluginHost, *, path: str, lines: dict, loc: tuple) -> list[Step]:
    """Configured steps of one chain (the manifest's, or a search candidate), in a valid phase order."""
    steps: list[Step] = []
    known = sorted(host.steps)
    where = fmt_loc(loc)
    for i, item in enumerate(items):
        item_loc = loc + (i,)
        try:
            name, params = parse_chain_item(item)
        except ValueError as exc:
            raise ManifestError(str(exc), path=path, line=line_for(lines, item_loc), field=fmt_loc(item_loc)) from None
        provided = host.steps.get(name)
        if provided is None:
            hint = _did_you_mean(name, known)
            raise ManifestError(
                f"unknown step `{name}`; installed steps: {', '.join(known)}",
                path=path,
                line=line_for(lines, item_loc),
                field=fmt_loc(item_loc),
                hint=hint or "install the plugin that provides it (`pipeline-stage plugins` lists what is installed)",
            )
        cls = provided.cls
        if params is not None and not isinstance(params, dict):
            raise ManifestError(
                f"params of step `{name}` must be a mapping, found {type(params).__name__}",
                path=path,
                line=line_for(lines, item_loc + (name,)),
                field=fmt_loc(item_loc + (name,)),
            )
        try:
            step_params = cls.Params.model_validate(params or {})
        except ValidationError as exc:
            raise _pydantic_error(exc, cls.Params, path, lines, prefix=item_loc + (name,), what=f" for step `{name}`") from None
        try:
            steps.append(cls(step_params))
        except Exception as exc:
            raise ManifestError(
                f"step `{name}` rejected its params: {exc}",
                path=path,
                line=line_for(lines, item_loc + (name,)),
                field=fmt_loc(item_loc + (name,)),
            ) from None

    for i in range(1, len(steps)):
        prev, cur = steps[i - 1], steps[i]
        if cur.phase.order < prev.phase.order:
            raise ManifestError(
                f"step `{cur.name}` (phase {cur.phase.value}) comes after `{prev.name}` (phase {prev.phase.value})",
                path=path,
                line=line_for(lines, loc + (i,)),
                field=f"{where}[{i}]",
                hint=f"order the chain by phase: {' -> '.join(p.value for p in Phase)}; move `{cur.name}` before `{prev.name}`",
            )
    return steps
