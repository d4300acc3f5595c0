"""The shape of embeddings/: modules import each other in one direction, each file stays small, and every name
that code outside the package imports from it is still there."""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "embeddings"
MAX_LINES = 400


def _module_imports(path: Path) -> set[str]:
    """The ``embeddings.*`` modules a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("embeddings."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("embeddings.")}
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
            if nxt not in state:
                found = visit(nxt, trail + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_checker_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_modules_of_embeddings_import_in_one_direction():
    graph = {p.stem: _module_imports(p) - {p.stem} for p in PACKAGE.glob("*.py")}
    assert len(graph) > 10
    circle = _cycle(graph)
    assert circle is None, "embeddings/ imports in a circle: " + " -> ".join(circle)


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_every_file_stays_under_the_size_limit(path):
    assert len(path.read_text().splitlines()) < MAX_LINES


def _imported_names() -> set[tuple[str, str]]:
    names = set()
    tops = [p for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".") and p != PACKAGE]
    for path in [*ROOT.glob("*.py"), *(q for top in tops for q in top.rglob("*.py"))]:
        try:
            tree = ast.parse(path.read_text(), filename=str(path))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("embeddings"):
                names |= {(node.module, a.name) for a in node.names}
    return names


def test_every_name_imported_from_outside_is_still_there():
    names = _imported_names()
    assert ("embeddings.store", "EmbeddingStore") in names
    missing = [f"{module}.{name}" for module, name in sorted(names)
               if not hasattr(importlib.import_module(module), name)]
    assert not missing, f"names imported outside embeddings/ that it no longer has: {missing}"
