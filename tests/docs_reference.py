"""The generated parts of the docs, from the code they describe: the manifest's field reference
(from `pipeline-stage schema`, built-in steps included) and the hook reference (from the hookspecs'
docstrings). tests/test_docs.py holds the pages to them; `python -m tests.docs_reference --write`
rewrites the pages' generated blocks after a change."""

from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCKS = {"manifest-reference": DOCS / "manifest.md", "hook-reference": DOCS / "plugins.md"}


def _type(node: dict, defs: dict) -> str:
    if "$ref" in node:
        return node["$ref"].rsplit("/", 1)[1]
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    if "const" in node:
        return f"`{node['const']}`"
    if "anyOf" in node:
        return " \\| ".join(_type(n, defs) for n in node["anyOf"])
    kind = node.get("type", "any")
    if kind == "array":
        return f"list of {_type(node.get('items', {}), defs)}"
    if kind == "object" and "additionalProperties" in node and isinstance(node["additionalProperties"], dict):
        return f"map of {_type(node['additionalProperties'], defs)}"
    return str(kind)


def _section(node: dict, defs: dict) -> dict | None:
    """The object schema a field holds (a section with fields of its own), or None."""
    for option in [node, *node.get("anyOf", [])]:
        if "$ref" in option:
            return defs[option["$ref"].rsplit("/", 1)[1]]
    return None


def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _rows(props: dict, required: list, defs: dict, prefix: str) -> list[str]:
    rows = []
    for name, node in props.items():
        field = f"{prefix}{name}"
        default = "required" if name in required else (f"`{json.dumps(node['default'])}`" if "default" in node else "-")
        kind = "list of steps (their params below)" if field == "chain" else _type(node, defs)
        rows.append(f"| `{field}` | {kind} | {default} | {_cell(node.get('description', ''))} |")
        section = _section(node, defs)
        if section is None and node.get("type") == "array" and field != "chain":
            section, field = _section(node.get("items", {}), defs), f"{field}[]"
        if section is not None and "properties" in section:
            rows += _rows(section["properties"], section.get("required", []), defs, f"{field}.")
    return rows


def manifest_reference() -> str:
    """Every field of the manifest, and every built-in step's params, as `pipeline-stage schema` has them."""
    from pipeline_stage.host.plugin_host import build_host
    from pipeline_stage.manifest import manifest_json_schema

    schema = manifest_json_schema(build_host(load_entry_points=False))
    defs = schema.get("$defs", {})
    lines = ["| field | type | default | description |", "| --- | --- | --- | --- |"]
    lines += _rows(schema["properties"], schema.get("required", []), defs, "")
    lines += [
        "",
        "Steps' params (`chain: [- <step>: {params}]`):",
        "",
        "| param | type | default | description |",
        "| --- | --- | --- | --- |",
    ]
    for item in schema["properties"]["chain"]["items"]["anyOf"]:
        if item.get("type") != "object":
            continue
        step = item["title"]
        params = next(o for o in item["properties"][step]["anyOf"] if o.get("type") == "object")
        lines += _rows(params.get("properties", {}), params.get("required", []), defs, f"{step}.")
    return "\n".join(lines)


def hook_reference() -> str:
    """Each hook as it is called, with its docstring (pipeline_stage/contract/hookspecs.py)."""
    from pipeline_stage.contract import hookspecs

    parts = []
    for name, spec in vars(hookspecs).items():
        if not hasattr(spec, "pipeline_stage_spec"):
            continue
        signature = f"{name}({', '.join(inspect.signature(spec).parameters)})"
        parts += [f"### `{signature}`", "", _markdown(inspect.getdoc(spec)), ""]
    return "\n".join(parts).rstrip()


def _markdown(doc: str) -> str:
    """A hookspec's reST docstring as Markdown: ``code`` and :class:`X` as `code`, each :param: a list item."""
    doc = re.sub(r":(?:class|func|mod|meth):`~?([^`]+)`", r"``\1``", doc).replace("``", "`")
    doc = re.sub(r"^:param (\w+):", r"- `\1`:", doc, flags=re.M)
    doc = re.sub(r"^:return:", "- returns:", doc, flags=re.M)
    return re.sub(r"\n    (?=\S)", "\n  ", doc)  # continuation lines stay in their list item


GENERATORS = {"manifest-reference": manifest_reference, "hook-reference": hook_reference}


def block(text: str, name: str) -> str:
    """What a page holds between its `<!-- name:start -->` and `<!-- name:end -->` markers."""
    match = re.search(rf"<!-- {name}:start -->\n(.*?)\n<!-- {name}:end -->", text, flags=re.S)
    if match is None:
        raise AssertionError(f"no generated block `{name}` in the page")
    return match.group(1)


def write() -> None:
    for name, page in BLOCKS.items():
        text = page.read_text()
        old = block(text, name)
        page.write_text(text.replace(f"<!-- {name}:start -->\n{old}\n", f"<!-- {name}:start -->\n{GENERATORS[name]()}\n"))


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    write()
