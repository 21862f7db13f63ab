"""The manifest: one YAML file, checked whole before any heavy work starts.

Everything a run needs is validated here, without TensorFlow: YAML syntax, field names and
types (with did-you-mean for unknown keys), step names against the installed plugins, each step's
params against its own schema, the chain's phase order, metric names, which data sets the chain
needs, and the shape of every URI. Errors name the file, the line and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline_stage.contract.errors import InputError, ManifestError
from pipeline_stage.contract.steps import Phase, Step
from pipeline_stage.host.plugin_host import PluginHost
from pipeline_stage.manifest.compile_targets import resolve_targets
from pipeline_stage.manifest.data_checks import check_inputs_for_metrics
from pipeline_stage.manifest.field_errors import did_you_mean, pydantic_error
from pipeline_stage.manifest.loaded import LoadedManifest
from pipeline_stage.manifest.schema import DATA_SETS, Manifest, check_model_uri
from pipeline_stage.manifest.yaml_text import MAX_NODES, NoDuplicatesLoader, expanded_size, fmt_loc, line_for, line_map


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


@dataclass(frozen=True)
class _Where:
    """The text being validated: every error names its file, line and field through :meth:`error`."""

    path: str
    lines: dict

    def error(self, message: str, loc: tuple = (), *, hint: str | None = None, field: str | None = None) -> ManifestError:
        return ManifestError(
            message,
            path=self.path,
            line=line_for(self.lines, loc) if loc else None,
            field=field or fmt_loc(loc) or None,
            hint=hint,
        )


def parse_manifest(
    text: str, host: PluginHost, *, path: str = "<manifest>", model_uri: str | None = None, read_data: bool = False
) -> LoadedManifest:
    """Validate manifest text (see :func:`load_manifest`), one section at a time."""
    raw = _read_yaml(text, path)
    where = _Where(path, line_map(text))
    manifest = _validate_fields(raw, where, model_uri)
    steps = parse_steps(manifest.chain, host, path=path, lines=where.lines, loc=("chain",))
    candidates, moves = _check_search(manifest, host, where)
    _check_source_kind(manifest, steps, candidates, host, where)
    _check_metric_names(manifest, host, where)
    loaded = LoadedManifest(
        path=path,
        manifest=manifest,
        steps=steps,
        raw=raw,
        text=text,
        lines=where.lines,
        candidates=candidates,
        moves=moves,
        digest_moves=_digest_moves(manifest, moves, host),
        compile_targets=resolve_targets(manifest, host, path, where.lines),
    )
    _check_data(loaded, host, where)
    check_inputs_for_metrics(loaded, host, read_data=read_data)
    _check_registration(manifest, where)
    return loaded


def _read_yaml(text: str, path: str) -> dict[str, Any]:
    """The document as a mapping with string keys, read safely (no Python objects, no alias bombs)."""
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
    if raw is None:
        raise ManifestError("the manifest is empty", path=path, hint="start from manifests/examples/digits-int8.yaml")
    if not isinstance(raw, dict):
        raise ManifestError(f"the manifest must be a mapping of fields, found a {type(raw).__name__}", path=path, line=1)
    for key in raw:
        if not isinstance(key, str):
            raise ManifestError(f"field names must be strings, found {key!r}", path=path, line=line_for(line_map(text), (key,)))
    return raw


def _validate_fields(raw: dict[str, Any], where: _Where, model_uri: str | None) -> Manifest:
    """The typed sections, and the model (`--model-uri` overrides the manifest's)."""
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise pydantic_error(exc, Manifest, where.path, where.lines) from None
    if model_uri is not None:
        try:
            check_model_uri(model_uri)
        except ValueError as exc:
            raise where.error(str(exc), field="--model-uri") from None
        manifest.model = model_uri
    if manifest.model is None:
        raise where.error(
            "no model given", field="model", hint="set `model: models:/<name>@<alias>` in the manifest or pass --model-uri"
        )
    return manifest


def _check_source_kind(
    manifest: Manifest, steps: list[Step], candidates: list[list[Step]], host: PluginHost, where: _Where
) -> None:
    """Each step's `check_source`, when the model URI shows the source kind (otherwise the stage
    asks it after the download, before the baseline)."""
    kind = host.source_kind_of(manifest.model)
    if kind is None:
        return
    cls = host.source_classes[kind]
    chains = [(("chain",), steps)] + [(("search", "candidates", k), chain) for k, chain in enumerate(candidates)]
    for loc, chain in chains:
        for i, step in enumerate(chain):
            if step.phase is Phase.MODEL and not cls.editable and manifest.search is None:
                # (a search may start from such a chain: its moves and candidates may do without the step)
                exc = cls.refuse_edit(step.name, manifest.model)
                raise where.error(exc.message, loc + (i, step.name), hint=exc.hint)
            try:
                step.check_source(kind)
            except InputError as exc:
                raise where.error(f"{exc.message} (model `{manifest.model}`)", loc + (i, step.name), hint=exc.hint) from None


def _check_metric(name: str, host: PluginHost, where: _Where, loc: tuple) -> None:
    if host.metric_for(name) is None:
        known = sorted(host.metrics)
        raise where.error(f"unknown metric `{name}`; installed metrics: {', '.join(known)}", loc, hint=did_you_mean(name, known))


def _check_metric_names(manifest: Manifest, host: PluginHost, where: _Where) -> None:
    """Every metric the evaluation section and the gates name is installed."""
    for key, names in (("metrics", manifest.evaluation.metrics or []), ("per_step", manifest.evaluation.per_step)):
        for j, name in enumerate(names):
            _check_metric(name, host, where, ("evaluation", key, j))
    for j, gate in enumerate(manifest.gates):
        _check_metric(gate.metric, host, where, ("gates", j, "metric"))


def _check_search(manifest: Manifest, host: PluginHost, where: _Where) -> tuple[list[list[Step]], list[str]]:
    """The search section: its candidates configured, its moves known (and one that applies to
    the chain for `auto`), its objective's metrics installed."""
    search = manifest.search
    if search is None:
        return [], []
    if search.strategy == "candidates" and not search.candidates:
        raise where.error(
            "strategy `candidates` needs at least one chain under `search.candidates`",
            ("search", "strategy"),
            field="search.candidates",
            hint="add `candidates: [[{fuse: {}}, {quantize: {mode: int8}}], ...]`, or use strategy auto",
        )
    moves = _search_moves(search.moves, host, path=where.path, lines=where.lines)
    if search.strategy == "auto":
        as_written = [(name, dict(params or {})) for name, params in map(parse_chain_item, manifest.chain)]
        usable = [host.moves[n].cls for n in moves if host.moves[n].cls().applies(as_written)]
        if not usable:
            needs = "; ".join(f"`{n}` needs {host.moves[n].cls.requirement or 'another chain'}" for n in moves)
            raise where.error(
                f"strategy `auto` has no search move for this chain ({needs or 'no moves installed'})",
                ("search", "strategy"),
                hint="change the chain so that a move applies (e.g. `- quantize: {mode: int8}`), or use strategy candidates",
            )
        if not manifest.gates:
            raise where.error(
                "strategy `auto` searches until the gates pass, but there are no gates",
                ("search",),
                field="gates",
                hint="add e.g. `- {metric: accuracy, max_drop: 0.01}`",
            )
    candidates = [
        parse_steps(chain, host, path=where.path, lines=where.lines, loc=("search", "candidates", k))
        for k, chain in enumerate(search.candidates)
    ]
    for j, name in enumerate(search.objective):
        _check_metric(name, host, where, ("search", "objective", j))
    return candidates, moves


def _check_data(loaded: LoadedManifest, host: PluginHost, where: _Where) -> None:
    """Every data set the steps, metrics and gates need is given; a `format` names a loader."""
    for data_set in DATA_SETS:
        entry = loaded.manifest.data.source(data_set)
        if entry is not None and entry.format is not None and entry.format not in host.loaders:
            raise where.error(
                f"`data.{data_set}.format`: no data loader is named `{entry.format}` (known: {', '.join(sorted(host.loaders))})",
                ("data", data_set, "format"),
                hint="name one of those, or leave `format` out to choose by the file's suffix",
            )
    for data_set in sorted(loaded.required_data(host)):
        if getattr(loaded.manifest.data, data_set) is None:
            users = [s.name for s in loaded.steps if data_set in s.required_data()] or ["the metrics and gates"]
            raise where.error(
                f"`{data_set}` data is required by {', '.join(users)} but not given",
                ("data",),
                field=f"data.{data_set}",
                hint=f"add `data: {{{data_set}: <URI of an .npz with arrays x and y>}}`",
            )


def _check_registration(manifest: Manifest, where: _Where) -> None:
    if manifest.registration is not None and manifest.registration.alias and not manifest.gates:
        # Moving an alias with no gate would promote anything; require the author to say so.
        raise where.error(
            "`register.alias` is set but there are no gates to decide when to move it",
            ("register", "alias"),
            hint="add at least one gate, e.g. `- {metric: accuracy, max_drop: 0.01}`",
        )


def _digest_moves(manifest: Manifest, moves: list[str], host: PluginHost) -> list[str]:
    """The moves a search's digest counts: those it may use, less a move added after the digest
    was defined (``SearchMove.digest_when_named``) that the manifest does not name, so a search
    written before that move keeps its digest (a version it registered is still reused)."""
    if manifest.search is None or manifest.search.moves is not None:
        return list(moves)
    return [n for n in moves if not host.moves[n].cls.digest_when_named]


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
                hint=did_you_mean(name, known) or "install the plugin that provides it (`pipeline-stage plugins` lists them)",
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
            hint = did_you_mean(name, known)
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
            raise pydantic_error(exc, cls.Params, path, lines, prefix=item_loc + (name,), what=f" for step `{name}`") from None
        try:
            step = cls(step_params)
        except Exception as exc:
            raise ManifestError(
                f"step `{name}` rejected its params: {exc}",
                path=path,
                line=line_for(lines, item_loc + (name,)),
                field=fmt_loc(item_loc + (name,)),
            ) from None
        try:
            step.check_plugins(host)
        except InputError as exc:
            raise ManifestError(
                exc.message, path=path, line=line_for(lines, item_loc + (name,)), field=fmt_loc(item_loc + (name,)), hint=exc.hint
            ) from None
        steps.append(step)

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
