"""The README is a front page and docs/ the reference: the pages' generated parts match the code
they describe, every relative link and anchor resolves, and the front page stays short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.docs_reference import BLOCKS, GENERATORS, block

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "RESULTS.md"]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The page without its fenced code blocks (a `#` comment in a block is not a heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lowercased, punctuation dropped, spaces to hyphens."""
    out: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", _prose(path.read_text()), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n, candidate = 1, slug
        while candidate in out:  # repeated headings get -1, -2, ...
            candidate, n = f"{slug}-{n}", n + 1
        out.add(candidate)
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, broken


def test_the_readme_is_a_front_page():
    text = (REPO / "README.md").read_text()
    assert len(text) <= 15_000, len(text)
    first_block = text.split("```bash", 1)[1].split("```", 1)[0]
    assert "pipeline-stage demo" in first_block and "bash scripts/test.sh" in first_block
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in text, f"the README does not link docs/{page.name}"


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_generated_reference_matches_the_code(name):
    """The manifest's field reference is `pipeline-stage schema`'s; the hook reference the hookspecs'
    (refresh both with `python -m tests.docs_reference --write`)."""
    assert block(BLOCKS[name].read_text(), name) == GENERATORS[name](), f"run `python -m tests.docs_reference --write` ({name})"


def test_the_manifest_reference_names_every_field_of_the_schema():
    """Independently of the generator: every section and field of the JSON Schema is in the page."""
    from pipeline_stage.host.plugin_host import build_host
    from pipeline_stage.manifest import manifest_json_schema

    schema = manifest_json_schema(build_host(load_entry_points=False))
    page = (REPO / "docs" / "manifest.md").read_text()
    for name, node in schema["properties"].items():
        assert f"| `{name}` |" in page, name
        ref = next((o["$ref"] for o in [node, *node.get("anyOf", [])] if "$ref" in o), None)
        if ref is not None:
            for field in schema["$defs"][ref.rsplit("/", 1)[1]].get("properties", {}):
                assert f"| `{name}.{field}` |" in page, f"{name}.{field}"


def test_the_readme_minimal_manifest_validates(manifest):
    from pipeline_stage.host.plugin_host import build_host
    from pipeline_stage.manifest import parse_manifest

    text = (REPO / "README.md").read_text().split("## A minimal manifest", 1)[1]
    manifest = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    loaded = parse_manifest(manifest, build_host(load_entry_points=False), path="README.md")
    assert [s.name for s in loaded.steps] == ["quantize"] and loaded.manifest.registration.alias == "edge-candidate"


def test_the_plugin_guide_examples_are_the_tested_code():
    """The worked examples in docs/plugins.md are the code the tests run (datasette's cog rule)."""
    import inspect

    from tests.fake_plugins import LinearSource

    page = (REPO / "docs" / "plugins.md").read_text()
    examples = {
        "linear-source": inspect.getsource(LinearSource),
        "acme-engine": (REPO / "tests" / "engine_pkg" / "pipeline_stage_acme" / "__init__.py").read_text(),
    }
    for name, code in examples.items():
        shown = block(page, f"example:{name}").strip().removeprefix("```python").removesuffix("```").strip()
        assert shown == code.strip(), f"docs/plugins.md's {name} example differs from the code the tests run"
