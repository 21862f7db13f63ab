"""The plugin manager: built-ins, installed plugins, and what they provide.

Third-party and in-house plugins are ordinary Python distributions (name them
``pipeline-stage-<name>``) that declare an entry point in the group ``pipeline_stage``::

    [project.entry-points.pipeline_stage]
    my_plugin = "pipeline_stage_my_plugin.hooks"

The module it names implements hooks from :mod:`pipeline_stage.contract.hookspecs` with
``from pipeline_stage import hookimpl``. Built-ins (``pipeline_stage_plugins.*``) use the same API
and are registered by module path, so they work without installed metadata.

Operators can limit what loads:

* ``PIPELINE_STAGE_LOAD_PLUGINS=a,b`` loads only these entry points (by entry-point or
  distribution name); an empty value loads none.
* ``PIPELINE_STAGE_DISABLE_PLUGINS=a,b`` blocks these; a built-in is blocked by its module name
  (``quantize`` or ``pipeline_stage_plugins.quantize``), and everything it provides goes with it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import pluggy

from pipeline_stage.contract import hookspecs
from pipeline_stage.contract.compilers import AcceleratorCompiler
from pipeline_stage.contract.data import DataLoader
from pipeline_stage.contract.engines import QuantizationEngine
from pipeline_stage.contract.errors import PluginLoadError
from pipeline_stage.contract.metrics import Metric
from pipeline_stage.contract.moves import SearchMove
from pipeline_stage.contract.sources import ModelSource
from pipeline_stage.contract.steps import Phase, Step

ENTRY_POINT_GROUP = "pipeline_stage"
OWN_DISTRIBUTION = "pipeline-stage"

# Registration order is the order of equal-cost search moves (fuse's before quantize's), and the
# order sources are asked to recognise a model (Keras before SavedModel before .tflite).
DEFAULT_PLUGINS = (
    "pipeline_stage_plugins.source_tensorflow",
    "pipeline_stage_plugins.source_tflite",
    "pipeline_stage_plugins.source_pytorch",
    "pipeline_stage_plugins.fuse",
    "pipeline_stage_plugins.quantize",
    "pipeline_stage_plugins.prune",
    "pipeline_stage_plugins.delegates",
    "pipeline_stage_plugins.compile_litert",
    "pipeline_stage_plugins.strip_ops",
    "pipeline_stage_plugins.analyze",
    "pipeline_stage_plugins.metrics",
    "pipeline_stage_plugins.data_npz",
    "pipeline_stage_plugins.data_npy",
    "pipeline_stage_plugins.data_tfrecord",
    "pipeline_stage_plugins.console",
)


@dataclass(frozen=True)
class Provided:
    """A registered class and where it came from."""

    cls: type
    plugin: str
    distribution: str


@dataclass
class PluginHost:
    """What the installed plugins provide (model sources, quantization engines, accelerator
    compilers, steps, metrics, data loaders, search moves, Keras objects) by name, with the distribution that provided each, and the
    pluggy manager that calls their hooks."""

    pm: pluggy.PluginManager
    sources: dict[str, Provided] = field(default_factory=dict)  # model kinds, in registration order
    engines: dict[str, Provided] = field(default_factory=dict)  # quantization engines
    compilers: dict[str, Provided] = field(default_factory=dict)  # accelerator compilers
    steps: dict[str, Provided] = field(default_factory=dict)
    metrics: dict[str, Provided] = field(default_factory=dict)
    loaders: dict[str, Provided] = field(default_factory=dict)
    moves: dict[str, Provided] = field(default_factory=dict)  # search moves, in registration order
    keras_objects: dict[str, Any] = field(default_factory=dict)  # custom_objects for keras.saving.load_model
    op_resolvers: dict[str, tuple[str, str]] = field(default_factory=dict)  # custom op -> (registerer, plugin)
    distributions: dict[str, str] = field(default_factory=dict)  # plugin name -> "dist version"

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def metric_for(self, name: str) -> tuple[Provided, str | None] | None:
        """The metric a name means, and the output it is restricted to: `accuracy` -> (accuracy,
        None); `fidelity_sqnr_db.level` -> (fidelity_sqnr_db, "level") for a metric computed on
        predictions; None for an unknown name."""
        if name in self.metrics:
            return self.metrics[name], None
        for i, char in enumerate(name):
            base = name[:i]
            if char == "." and base in self.metrics and self.metrics[base].cls.uses == "predictions" and name[i + 1 :]:
                return self.metrics[base], name[i + 1 :]
        return None

    def metric_class(self, name: str) -> type:
        """The class of a known metric name (`<metric>.<output>` included)."""
        found = self.metric_for(name)
        if found is None:
            raise KeyError(name)
        return found[0].cls

    @property
    def source_classes(self) -> dict[str, type]:
        """The model source classes by kind, in registration order (the order they are asked in)."""
        return {name: provided.cls for name, provided in self.sources.items()}

    def source_kind_of(self, uri: str | None) -> str | None:
        """The source kind a model URI shows by its file suffix (a source's ``suffixes``), or None
        when only the download tells (a folder, a registry or logged model)."""
        path = (uri or "").split("?")[0].rstrip("/").lower()
        for name, provided in self.sources.items():
            if provided.cls.suffixes and path.endswith(tuple(s.lower() for s in provided.cls.suffixes)):
                return name
        return None

    def op_registerers(self) -> list[str]:
        """Every custom op registerer the plugins registered, once each, in registration order."""
        return list(dict.fromkeys(registerer for registerer, _ in self.op_resolvers.values()))

    def loader_for(self, suffix: str) -> Provided | None:
        for provided in self.loaders.values():
            if suffix.lower() in provided.cls.suffixes:
                return provided
        return None


def _own_distribution() -> str:
    try:
        return f"{OWN_DISTRIBUTION} {importlib.metadata.version(OWN_DISTRIBUTION)}"
    except importlib.metadata.PackageNotFoundError:
        return OWN_DISTRIBUTION


def _csv_env(name: str) -> set[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def _entry_points() -> Iterable[tuple[importlib.metadata.EntryPoint, str]]:
    seen: set[tuple[str, str]] = set()
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP or (ep.name, ep.value) in seen:
                continue
            seen.add((ep.name, ep.value))
            yield ep, f"{dist.metadata['Name']} {dist.version}"


def load_entry_point_plugins(pm: pluggy.PluginManager, distributions: dict[str, str]) -> None:
    """Import and register every plugin of the ``pipeline_stage`` entry-point group.

    Done by hand rather than with ``pm.load_setuptools_entrypoints`` so that a plugin that fails
    to import is reported with its distribution, not as a bare traceback.
    """
    allow = _csv_env("PIPELINE_STAGE_LOAD_PLUGINS")
    blocked = _csv_env("PIPELINE_STAGE_DISABLE_PLUGINS") or set()
    for ep, dist in _entry_points():
        dist_name = dist.split(" ")[0]
        if allow is not None and not ({ep.name, dist_name} & allow):
            continue
        if {ep.name, dist_name} & blocked:
            pm.set_blocked(ep.name)
            continue
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must name itself, whatever it raised
            raise PluginLoadError(
                f"plugin `{ep.name}` ({ep.value}) from distribution `{dist}` failed to import: {type(exc).__name__}: {exc}",
                hint=f"fix or uninstall `{dist_name}`, or set PIPELINE_STAGE_DISABLE_PLUGINS={ep.name}",
            ) from exc
        pm.register(plugin, name=ep.name)
        distributions[ep.name] = dist


def _class_registrar(kind: str, base: type, table: dict[str, Provided]):
    """A factory of `register(cls)` callbacks for one plugin, validating each class it registers."""
    return lambda plugin, dist: _registrar(kind, base, table, plugin, dist)


def _object_registrar(table: dict[str, Any]):
    """`register(name, obj)` for Keras objects: a name, and no name taken twice."""
    owners: dict[str, str] = {}

    def for_plugin(plugin: str, dist: str):
        def register(name: str, obj: Any) -> None:
            who = f"plugin `{plugin}` (distribution `{dist}`)"
            if not isinstance(name, str) or not name:
                raise PluginLoadError(
                    f"{who} registered a Keras object without a name", hint="call register('package>ClassName', TheClass)"
                )
            if name in table and table[name] is not obj:
                raise PluginLoadError(
                    f"{who} registers Keras object `{name}`, but that name is already taken by {owners[name]}",
                    hint="rename one of them, or disable one with PIPELINE_STAGE_DISABLE_PLUGINS",
                )
            table[name] = obj
            owners[name] = who

        return register

    return for_plugin


def _op_resolver_registrar(table: dict[str, tuple[str, str]]):
    """`register(registerer, ops=[...])` for custom op kernels: a registerer named as a string, ops
    named, and no op provided twice by different registerers."""

    def for_plugin(plugin: str, dist: str):
        def register(registerer: str, ops: Iterable[str] = ()) -> None:
            who = f"plugin `{plugin}` (distribution `{dist}`)"
            ops = [ops] if isinstance(ops, str) else list(ops)
            if not isinstance(registerer, str) or not registerer or not ops or not all(isinstance(o, str) and o for o in ops):
                raise PluginLoadError(
                    f"{who} registered an op resolver without a registerer name or the ops it provides",
                    hint="call register('package.module:RegistererFunction', ops=['CustomOpName'])",
                )
            for op in ops:
                if op in table and table[op][0] != registerer:
                    raise PluginLoadError(
                        f"{who} registers custom op `{op}` ({registerer}), but {table[op][1]} already provides it ({table[op][0]})",
                        hint="disable one of them with PIPELINE_STAGE_DISABLE_PLUGINS",
                    )
                table[op] = (registerer, who)

        return register

    return for_plugin


def _registrar(kind: str, base: type, table: dict[str, Provided], plugin: str, dist: str):
    def register(cls: Any) -> None:
        who = f"plugin `{plugin}` (distribution `{dist}`)"
        if not isinstance(cls, type):
            raise PluginLoadError(
                f"{who} registered {cls!r} as a {kind}; expected a class",
                hint=f"pass the class itself, a subclass of {base.__module__}.{base.__name__}",
            )
        if not issubclass(cls, base):
            raise PluginLoadError(f"{who} registered {cls.__name__}, which is not a subclass of {base.__name__}")
        name = getattr(cls, "name", "")
        if not name or not isinstance(name, str):
            raise PluginLoadError(f"{who} registered {kind} class {cls.__name__} without a `name`")
        if kind == "step" and not isinstance(getattr(cls, "phase", None), Phase):
            raise PluginLoadError(f"{who}: step `{name}` has no valid `phase` (one of {[p.value for p in Phase]})")
        if kind == "search move" and getattr(cls, "kind", None) not in ("alternative", "refine"):
            raise PluginLoadError(f"{who}: search move `{name}` has no valid `kind` (alternative or refine)")
        if name in table and table[name].cls is not cls:
            other = table[name]
            raise PluginLoadError(
                f"{who} registers {kind} `{name}` ({cls.__module__}.{cls.__name__}), but that name "
                f"is already taken by plugin `{other.plugin}` from distribution `{other.distribution}` "
                f"({other.cls.__module__}.{other.cls.__name__})",
                hint="rename one of them, or disable one with PIPELINE_STAGE_DISABLE_PLUGINS",
            )
        table[name] = Provided(cls, plugin, dist)

    return register


def _collect(host: PluginHost, hook_name: str, registrar) -> None:
    """Call every implementation of a registration hook with its own `register`, validated; any
    exception a plugin raises there becomes a PluginLoadError that names its distribution."""
    caller = getattr(host.pm.hook, hook_name)
    # Call each implementation with its own `register`, so every registration knows its source.
    # Registration order (built-ins first), so a clash is blamed on the later plugin.
    for impl in caller.get_hookimpls():
        dist = host.distributions.get(impl.plugin_name, impl.plugin_name)
        register = registrar(impl.plugin_name, dist)
        try:
            impl.function(**({"register": register} if "register" in impl.argnames else {}))
        except PluginLoadError:
            raise
        except Exception as exc:
            raise PluginLoadError(
                f"plugin `{impl.plugin_name}` (distribution `{dist}`) failed in {hook_name}: {type(exc).__name__}: {exc}"
            ) from exc


def build_host(*, load_entry_points: bool = True, extra_plugins: Iterable[tuple[object, str]] = ()) -> PluginHost:
    """Create the plugin manager and collect what every plugin registers.

    :param load_entry_points: load installed plugins from the ``pipeline_stage`` group.
    :param extra_plugins: ``(plugin, name)`` pairs to register too (tests use fake plugins).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    distributions: dict[str, str] = {}
    own = _own_distribution()
    blocked = _csv_env("PIPELINE_STAGE_DISABLE_PLUGINS") or set()
    for module_name in DEFAULT_PLUGINS:
        if {module_name, module_name.rsplit(".", 1)[1]} & blocked:
            pm.set_blocked(module_name)  # a built-in left out: its steps, engines and moves with it
            continue
        pm.register(importlib.import_module(module_name), module_name)
        distributions[module_name] = own
    if load_entry_points:
        load_entry_point_plugins(pm, distributions)
    for plugin, name in extra_plugins:
        pm.register(plugin, name=name)
        distributions.setdefault(name, name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        # pluggy names the plugin object (`exc.plugin`), not its registration name
        name = pm.get_name(exc.plugin) or ""
        dist = distributions.get(name, name or "?")
        raise PluginLoadError(
            f"plugin `{name}` (distribution `{dist}`): {exc}",
            hint="check the hook's name against `pipeline_stage.contract.hookspecs` "
            "(`pipeline-stage plugins` lists the hooks each plugin implements)",
        ) from exc
    host = PluginHost(pm=pm, distributions=distributions)
    _collect(host, "register_sources", _class_registrar("model source", ModelSource, host.sources))
    _collect(host, "register_quantization_engines", _class_registrar("quantization engine", QuantizationEngine, host.engines))
    _collect(host, "register_compilers", _class_registrar("accelerator compiler", AcceleratorCompiler, host.compilers))
    _collect(host, "register_steps", _class_registrar("step", Step, host.steps))
    _collect(host, "register_metrics", _class_registrar("metric", Metric, host.metrics))
    _collect(host, "register_data_loaders", _class_registrar("data loader", DataLoader, host.loaders))
    _collect(host, "register_search_moves", _class_registrar("search move", SearchMove, host.moves))
    _collect(host, "register_keras_objects", _object_registrar(host.keras_objects))
    _collect(host, "register_op_resolvers", _op_resolver_registrar(host.op_resolvers))
    return host


_host: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide host, built on first use (nothing loads at import time)."""
    global _host
    if _host is None:
        _host = build_host()
    return _host


def reset_host() -> None:
    """Forget the process-wide host: the next use builds it again (from what is installed then)."""
    global _host
    _host = None


@contextlib.contextmanager
def use_plugins(*plugins: object, entry_points: bool = False) -> Iterator[PluginHost]:
    """Run with a chosen set of plugins, in this process: the built-ins, `plugins` (modules or
    objects with ``@hookimpl`` functions, or ``(plugin, name)`` pairs), and with `entry_points` the
    installed ones. Every command run in this process inside the block (``pipeline-stage run``,
    ``validate``, ``plugins``; the CLI through click's test runner) uses them; the host before it
    comes back after. A search's trials run in worker processes, which load the installed plugins:
    a step or metric a trial needs must be installed (a search move runs in the stage's process).

    A plugin's own tests::

        from pipeline_stage import use_plugins
        import my_plugin

        with use_plugins(my_plugin) as host:
            assert "my_step" in host.steps
    """
    global _host
    named = [p if isinstance(p, tuple) else (p, getattr(p, "__name__", None) or type(p).__name__) for p in plugins]
    before, _host = _host, build_host(load_entry_points=entry_points, extra_plugins=named)
    try:
        yield _host
    finally:
        _host = before
