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
