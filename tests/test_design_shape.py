"""The shape of the code, held: no module over 400 lines, no import circle, and the two
orchestrators read as named phases (Stage.run, register_version)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = [REPO / "pipeline_stage", REPO / "plugins"]


def test_no_module_is_over_400_lines():
    long = {
        str(path.relative_to(REPO)): n
        for root in PACKAGES
        for path in root.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > 400
    }
    assert not long, long


def test_no_import_circle():
    import grimp

    graph = grimp.build_graph("pipeline_stage", "pipeline_stage_plugins")
    circles = [
        (module, imported)
        for module in graph.modules
        for imported in graph.find_modules_directly_imported_by(module)
        if graph.chain_exists(importer=imported, imported=module)
    ]
    assert not circles, circles


def _body_lines(path: Path, qualname: str) -> int:
    """Lines of a function's body, its docstring left out."""
    tree = ast.parse(path.read_text())
    scope: list = tree.body
    node = None
    for part in qualname.split("."):
        node = next(n for n in scope if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == part)
        scope = node.body
    first = node.body[1] if ast.get_docstring(node) else node.body[0]
    return node.end_lineno - first.lineno + 1


def test_the_orchestrators_are_named_phases():
    assert _body_lines(REPO / "pipeline_stage" / "run" / "stage.py", "Stage.run") <= 20
    for name in ("Stage._open", "Stage._start", "Stage._load", "Stage._execute", "Stage._finish", "Stage._register"):
        assert _body_lines(REPO / "pipeline_stage" / "run" / "stage.py", name) <= 50, name
    registry = REPO / "pipeline_stage" / "mlflow_io" / "model_registry.py"
    for name in ("register_version", "_log_pyfunc", "_stored_digests", "_create_version", "_Undo.all"):
        assert _body_lines(registry, name) <= 50, name
