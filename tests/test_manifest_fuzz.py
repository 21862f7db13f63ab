"""Property: whatever the manifest text, the loader either accepts it or raises ManifestError
(exit 2, one message) -- never another exception."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline_stage.contract.errors import ManifestError
from pipeline_stage.host.plugin_host import build_host
from pipeline_stage.manifest import parse_manifest
from tests.figures import add
from tests.helpers import EXAMPLES

REGISTRY = build_host(load_entry_points=False)
EXAMPLE = (EXAMPLES / "digits-int8.yaml").read_text()

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["quantize", "int8", "accuracy", "models:/a@b", "runs:/x/y", "max_drop", "size_bytes", "register", "chain"]),
)
keys = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        [
            "model",
            "data",
            "chain",
            "gates",
            "register",
            "evaluation",
            "quantize",
            "mode",
            "io",
            "metric",
            "max_drop",
            "name",
            "alias",
            "calibration",
            "evaluation",
            "per_step",
        ]
    ),
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=5), st.dictionaries(keys, children, max_size=6)),
    max_leaves=30,
)


def _check(text: str) -> None:
    add("bad inputs tried: fuzzed manifests")
    try:
        parse_manifest(text, REGISTRY, path="fuzz.yaml")
    except ManifestError as exc:
        assert exc.exit_code == 2 and str(exc).startswith("fuzz.yaml")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_random_documents(doc):
    _check(yaml.safe_dump(doc))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutations_of_the_example(data):
    lines = EXAMPLE.splitlines()
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(lines) - 1))
        op = data.draw(st.sampled_from(["delete", "duplicate", "replace", "insert", "indent", "truncate"]))
        if op == "delete" and len(lines) > 1:
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "replace":
            token = data.draw(st.text(max_size=15))
            words = lines[i].split(" ")
            words[data.draw(st.integers(0, len(words) - 1))] = token
            lines[i] = " ".join(words)
        elif op == "insert":
            lines.insert(i, data.draw(st.text(max_size=30)))
        elif op == "indent":
            lines[i] = " " * data.draw(st.integers(0, 6)) + lines[i].lstrip()
        else:
            lines[i] = lines[i][: data.draw(st.integers(0, len(lines[i])))]
    _check("\n".join(lines))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text(text):
    _check(text)


@settings(max_examples=25, deadline=None)
@given(documents)
def test_cli_always_exits_0_or_2(tmp_path_factory, invoke, doc):  # hypothesis fills the last argument
    path = tmp_path_factory.mktemp("fuzz") / "m.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = invoke("validate", str(path))
    assert result.exit_code in (0, 2)
    if result.exit_code == 2:
        assert result.stderr.startswith(f"error: {path}") and "Traceback" not in result.stderr
