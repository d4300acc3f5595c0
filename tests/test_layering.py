"""The layering rules of the design, enforced by reading every import in the tree."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"artifacts", "embeddings", "sae", "analysis", "scripts"}
# Which project packages each package may import.
ALLOWED = {
    "artifacts": set(),
    "embeddings": {"artifacts"},
    "sae": {"artifacts"},
    "analysis": {"artifacts", "embeddings", "sae"},
    "scripts": {"artifacts", "embeddings", "sae", "analysis"},
    "benchmarks": {"artifacts", "embeddings", "sae", "analysis"},
    "tests": {"artifacts", "embeddings", "sae", "analysis"},
}


def project_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {name.split(".")[0] for name in names} & PROJECT
    return found


def test_every_file_respects_the_layering():
    violations = []
    n_files = 0
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            n_files += 1
            bad = project_imports(path) - allowed - {package}
            if package == "scripts":
                bad |= project_imports(path) & {"scripts"}
            if bad:
                violations.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert n_files > 5
    assert not violations, "layering broken:\n" + "\n".join(violations)


@pytest.mark.parametrize(
    "source, package, ok",
    [
        ("import sae.model", "embeddings", False),
        ("from embeddings.store import EmbeddingStore", "sae", False),
        ("from sae import model", "analysis", True),
        ("import scripts.extract", "analysis", False),
        ("from . import model", "sae", True),
        ("import numpy", "artifacts", True),
    ],
)
def test_checker_catches_forbidden_imports(tmp_path, source, package, ok):
    path = tmp_path / "m.py"
    path.write_text(source + "\n")
    bad = project_imports(path) - ALLOWED[package] - {package}
    assert (not bad) == ok


STUDIES = {"concepts", "ttt", "theory"}
TOP = {"run", "report"}


def analysis_part(module: str) -> str:
    """``core`` for a top-level module of analysis/, else the name of its package."""
    parts = module.split(".")
    if len(parts) >= 2 and (ROOT / "analysis" / parts[1]).is_dir():
        return parts[1]
    return "core"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every project module ``path`` imports, resolved to a module that exists (``from a.b import c`` names
    ``a.b.c`` when that is a module, else ``a.b``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]
            candidates = [m for m in submodules if is_module(m)] or [node.module]
        else:
            continue
        found |= {name for name in candidates if name.split(".")[0] in PROJECT and is_module(name)}
    return found


def is_module(name: str) -> bool:
    base = ROOT / name.replace(".", "/")
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def test_analysis_core_and_studies_import_in_one_direction():
    """The core imports no study package; a study imports the core and itself only; run/ and report/ sit on top."""
    violations = []
    for path in sorted((ROOT / "analysis").rglob("*.py")):
        here = analysis_part(module_name(path))
        for name in imported_modules(path):
            if not name.startswith("analysis.") or here in TOP:
                continue
            there = analysis_part(name)
            if there == here or there == "core":
                continue
            violations.append(f"{path.relative_to(ROOT)} ({here}) imports {name} ({there})")
    assert not violations, "analysis layering broken:\n" + "\n".join(violations)


def test_no_import_cycles_between_files():
    graph = {}
    for package in ("artifacts", "embeddings", "sae", "analysis"):
        for path in (ROOT / package).rglob("*.py"):
            graph[module_name(path)] = {m for m in imported_modules(path) if m != module_name(path)}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert len(graph) > 20
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_file_over_400_lines():
    long = [f"{p.relative_to(ROOT)}: {n}" for package in ("artifacts", "embeddings", "sae", "analysis", "scripts")
            for p in sorted((ROOT / package).rglob("*.py")) if (n := len(p.read_text().splitlines())) > 400]
    assert not long, "files over 400 lines:\n" + "\n".join(long)
