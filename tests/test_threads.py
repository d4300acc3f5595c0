"""OpenMP threads sleep instead of spinning in every entry point (set before torch, FAISS or numba load)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "faiss", "numba", "umap", "sklearn", "timm"}


@pytest.mark.parametrize("package", ["analysis", "embeddings", "sae", "artifacts"])
def test_importing_any_package_sets_the_passive_wait_policy_unless_set(package):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = f"import {package}, os; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={**env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert out.stdout.strip() == "ACTIVE"  # the user's own choice wins


def _first_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module.split(".")[0])
    return [n for n in names if n != "__future__"]


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.py")))
def test_every_script_imports_the_toolkit_before_torch_faiss_or_numba(script):
    names = _first_imports(ROOT / "scripts" / script)
    project = [i for i, n in enumerate(names) if n in {"analysis", "embeddings", "sae", "artifacts"}]
    heavy = [i for i, n in enumerate(names) if n in HEAVY]
    assert project, f"{script} imports nothing of the toolkit"
    assert not heavy or project[0] < heavy[0], f"{script} loads {names[heavy[0]]} before the toolkit sets the policy"
