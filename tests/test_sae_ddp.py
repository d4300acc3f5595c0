"""Data-parallel training under the real torchrun (2 CPU processes, gloo) equals one process.

Written to hold on a loaded 2-core machine:
- torchrun's ``--standalone`` rendezvous binds its store to a port the operating system picks at that moment
  and hands it to the workers. Choosing a free port first and passing it as ``--master-port`` leaves a window
  (seconds under load, while torchrun imports torch) in which another process can bind it; the launch then
  fails with "address already in use".
- Every process computes on one thread (``--threads 1`` and the OpenMP/MKL variables), so the two workers
  never contend for more than the 2 cores, and the training itself does not depend on timing
  (``--precision fp32``; ``auto`` measures speed).
- Each launch has a generous but bounded timeout, and a failure reports the elapsed time, the load average
  and the end of both output streams.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from embeddings.store import write_store

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_sae.py"
TIMEOUT_S = 900
"""Per launch. The two-process launch takes ~15 s on an idle 2-core machine and measured 100-200 s at a load
average of 11 (four busy loops beside other jobs); a launch still running after this has hung."""
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def flags(store_dir: Path, out: Path, variant: str) -> list[str]:
    # 65 train rows in batches of 32: the last batch of each epoch holds one row, so one rank has none
    # and the other all; a short dead window makes AuxK take part.
    return [
        "--store", str(store_dir), "--out", str(out), "--steps", "30", "--batch-size", "32", "--n-latents", "64",
        "--k", "3", "--dead-window", "64", "--checkpoint-every", "10", "--no-progress", "--device", "cpu",
        "--variant", variant, "--seed", "1", "--threads", "1", "--precision", "fp32",
    ]


def launch(args: list[str], what: str) -> subprocess.CompletedProcess:
    """Run ``python args`` from the repository root on one thread per process; fail with the evidence."""
    env = {**os.environ, **ONE_THREAD}
    start = time.monotonic()
    try:
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{what} still running after {TIMEOUT_S} s (load average {os.getloadavg()}):\n"
                    f"{_tail(e.stdout)}\n{_tail(e.stderr)}")
    if done.returncode != 0:
        pytest.fail(f"{what} exited with {done.returncode} after {time.monotonic() - start:.0f} s (load average "
                    f"{os.getloadavg()}):\nstdout:\n{_tail(done.stdout)}\nstderr:\n{_tail(done.stderr)}")
    return done


def _tail(text, n: int = 3000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-n:]


def test_two_processes_equal_one(tmp_path):
    variant = "topk"  # the paper variant draws dropout masks per rank, so it cannot equal one process
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 12)).astype(np.float32)
    store = write_store(tmp_path / "store", x, split={"train": np.arange(65), "val": np.arange(65, 100)})
    launch([str(SCRIPT), *flags(store.store_dir, tmp_path / "one", variant)], "the one-process run")
    two = launch(
        ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(SCRIPT),
         *flags(store.store_dir, tmp_path / "two", variant)],
        "torchrun with 2 processes",
    )
    assert two.stdout.count("written to") == 1  # only rank 0 reports (and writes)
    a, b = load_file(str(tmp_path / "one" / "sae.safetensors")), load_file(str(tmp_path / "two" / "sae.safetensors"))
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5, err_msg=name)
    # The runs must not be trivially equal: training moved the weights away from their initialisation.
    assert not np.allclose(a["b_enc"], 0.0)

