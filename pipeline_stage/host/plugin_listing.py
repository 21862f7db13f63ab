"""What `pipeline-stage plugins` shows: every installed model source, quantization engine, step,
metric, data loader, search move and plugin, as plain data (`--json` prints it as it is)."""

from __future__ import annotations

from typing import Any

from pipeline_stage.host.plugin_host import PluginHost


def describe(host: PluginHost) -> dict[str, Any]:
    """Everything installed, as JSON-ready data (the ``plugins`` command)."""

    def params_of(cls: type) -> list[dict[str, Any]]:
        schema = cls.Params.model_json_schema()
        out = []
        for pname, fld in cls.Params.model_fields.items():
            prop = schema.get("properties", {}).get(pname, {})
            out.append(
                {
                    "name": pname,
                    "type": _type_name(prop),
                    "default": None if fld.is_required() else _jsonable(fld.get_default(call_default_factory=True)),
                    "required": fld.is_required(),
                    "doc": fld.description or "",
                }
            )
        return out

    return {
        "sources": [
            {
                "name": name,
                "title": p.cls.title,
                "flavors": list(p.cls.flavors),
                "suffixes": list(p.cls.suffixes),
                "summary": p.cls.summary(),
                "plugin": p.plugin,
                "distribution": p.distribution,
            }
            for name, p in host.sources.items()
        ],
        "engines": [
            {
                "name": name,
                "modes": list(p.cls.modes),
                "source_kinds": list(p.cls.source_kinds) or ["any"],
                "options": params_of(p.cls),
                "summary": p.cls.summary(),
                "plugin": p.plugin,
                "distribution": p.distribution,
            }
            for name, p in sorted(host.engines.items())
        ],
        "compilers": [
            {
                "name": name,
                "socs": list(p.cls.socs),
                "sdk": p.cls.sdk,
                "options": params_of(p.cls),
                "summary": p.cls.summary(),
                "plugin": p.plugin,
                "distribution": p.distribution,
            }
            for name, p in sorted(host.compilers.items())
        ],
        "custom_ops": [
            {"op": op, "registerer": registerer, "plugin": who} for op, (registerer, who) in sorted(host.op_resolvers.items())
        ],
        "steps": [
            {
                "name": name,
                "phase": p.cls.phase.value,
                "summary": p.cls.summary(),
                "params": params_of(p.cls),
                "support": p.cls.support_table(),
                "plugin": p.plugin,
                "distribution": p.distribution,
            }
            for name, p in sorted(host.steps.items())
        ],
        "metrics": [
            {
                "name": name,
                "higher_is_better": p.cls.higher_is_better,
                "unit": p.cls.unit,
                "summary": p.cls.summary(),
                "plugin": p.plugin,
                "distribution": p.distribution,
            }
            for name, p in sorted(host.metrics.items())
        ],
        "data_loaders": [
            {"name": name, "suffixes": list(p.cls.suffixes), "plugin": p.plugin, "distribution": p.distribution}
            for name, p in sorted(host.loaders.items())
        ],
        "search_moves": [
            {
                "name": name,
                "kind": p.cls.kind,
                "cost": p.cls.cost,
                "summary": p.cls.summary(),
                "requirement": p.cls.requirement,
                "plugin": p.plugin,
                "distribution": p.distribution,
            }
            for name, p in host.moves.items()
        ],
        "plugins": [
            {
                "name": name,
                "distribution": host.distributions.get(name, name),
                "hooks": sorted(h.name for h in (host.pm.get_hookcallers(plugin) or [])),
            }
            for name, plugin in sorted(host.pm.list_name_plugin(), key=lambda kv: kv[0])
        ],
    }


def _type_name(prop: dict[str, Any]) -> str:
    if "enum" in prop:
        return " | ".join(repr(v) for v in prop["enum"])
    if "const" in prop:
        return repr(prop["const"])
    if "anyOf" in prop:
        return " | ".join(_type_name(p) for p in prop["anyOf"])
    if prop.get("type") == "array":
        return f"list[{_type_name(prop.get('items', {}))}]"
    return prop.get("type", "any")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)
