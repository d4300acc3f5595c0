"""benchmarks/gpu_check.sh: it parses, every flag it passes exists, and without CUDA every row skips cleanly."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _rows() -> list[list[str]]:
    text = SCRIPT.read_text().replace("\\\n", " ")
    return [shlex.split(line)[1:] for line in text.splitlines() if line.startswith("row ")]


def test_the_script_parses_and_names_every_row():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert [r[0] for r in _rows()] == ["gpu-tests", "sae-step", "extract", "faiss-gpu-index", "ttt", "scale"]
    assert sum(int(r[1]) for r in _rows()) <= 600  # the whole check within ten minutes


@pytest.mark.parametrize("row", [r for r in _rows() if r[4].startswith("benchmarks/")], ids=lambda r: r[0])
def test_every_flag_a_row_passes_is_one_its_benchmark_takes(row):
    script, flags = row[4], [a for a in row[5:] if a.startswith("--")]
    helped = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert helped.returncode == 0, helped.stderr
    missing = [f for f in flags if not re.search(re.escape(f) + r"\b", helped.stdout)]
    assert not missing, f"{script} does not take {missing}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the rows run instead of skipping")
def test_without_cuda_every_row_skips_and_the_script_succeeds(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "GPU_CHECK_PYTHON": sys.executable}, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    assert lines[0].startswith("machine: no CUDA device")
    assert len(lines) == 1 + len(_rows()) and all("skipped: no CUDA device" in line for line in lines[1:])
