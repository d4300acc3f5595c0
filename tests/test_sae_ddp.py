"""Data-parallel training under the real torchrun (2 CPU processes, gloo) equals one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from embeddings.store import write_store

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_sae.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flags(store_dir: Path, out: Path, variant: str) -> list[str]:
    # 65 train rows in batches of 32: the last batch of each epoch holds one row, so one rank has none
    # and the other all; a short dead window makes AuxK take part.
    return [
        "--store", str(store_dir), "--out", str(out), "--steps", "30", "--batch-size", "32", "--n-latents", "64",
        "--k", "3", "--dead-window", "64", "--checkpoint-every", "10", "--no-progress", "--device", "cpu",
        "--variant", variant, "--seed", "1",
    ]


def test_two_processes_equal_one(tmp_path):
    variant = "topk"  # the paper variant draws dropout masks per rank, so it cannot equal one process
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 12)).astype(np.float32)
    store = write_store(tmp_path / "store", x, split={"train": np.arange(65), "val": np.arange(65, 100)})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, str(SCRIPT), *flags(store.store_dir, tmp_path / "one", variant)],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
         str(SCRIPT), *flags(store.store_dir, tmp_path / "two", variant)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("written to") == 1  # only rank 0 reports (and writes)
    a, b = load_file(str(tmp_path / "one" / "sae.safetensors")), load_file(str(tmp_path / "two" / "sae.safetensors"))
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5, err_msg=name)
    # The runs must not be trivially equal: training moved the weights away from their initialisation.
    assert not np.allclose(a["b_enc"], 0.0)
