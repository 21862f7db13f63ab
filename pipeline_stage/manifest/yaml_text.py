"""Safe YAML for manifests: no Python tags, no duplicate keys, no alias bombs, and the line of
every key path so that errors can point at it."""

from __future__ import annotations

from typing import Any

import yaml


def line_map(text: str) -> dict[tuple, int]:
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


class NoDuplicatesLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: NoDuplicatesLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key `{key}`", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


NoDuplicatesLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def fmt_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def line_for(lines: dict[tuple, int], loc: tuple) -> int | None:
    loc = tuple(loc)
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get(())


MAX_NODES = 100_000  # after expanding YAML aliases; a real manifest has a few hundred


def expanded_size(node: Any, memo: dict[int, int]) -> int:
    """Node count once aliases are expanded (a "billion laughs" document is tiny but explodes)."""
    key = id(node)
    if key not in memo:
        if isinstance(node, yaml.MappingNode):
            memo[key] = 1 + sum(expanded_size(k, memo) + expanded_size(v, memo) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            memo[key] = 1 + sum(expanded_size(v, memo) for v in node.value)
        else:
            memo[key] = 1
    return memo[key]
