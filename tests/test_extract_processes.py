"""Extraction across processes: a real SIGKILL mid-run then a rerun, and torchrun with 2 CPU processes, each
byte-identical to one uninterrupted single-process run."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from artifacts import partial_dir
from embeddings.extract import KILL_AFTER_CHUNK_ENV, ExtractConfig, ExtractRun, extract
from embeddings.store import STORE_FILES, EmbeddingStore

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "extract.py")
# digits, 1797 rows in 8 chunks of 256; one torch thread everywhere, so that no BLAS may split sums differently.
ARGS = ["--source", "digits", "--weights", "random", "--batch-size", "64", "--chunk-size", "256",
        "--threads", "1", "--num-workers", "0", "--no-progress", "--device", "cpu"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", KILL_AFTER_CHUNK_ENV)}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _store_bytes(store_dir):
    return {name: (Path(store_dir) / name).read_bytes() for name in STORE_FILES}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted single-process run (in this process, same settings as the command line)."""
    out = tmp_path_factory.mktemp("ref") / "store"
    cfg = ExtractConfig(source="digits", backbone="digits-cnn", weights="random", batch_size=64)
    run = ExtractRun(out_dir=out, device="cpu", num_workers=0, n_threads=1, chunk_size=256, progress=False)
    return extract(cfg, run)


def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path, reference):
    out = tmp_path / "store"
    cmd = [sys.executable, SCRIPT, *ARGS, "--out", str(out)]
    # The process kills itself with SIGKILL right after writing chunk 2 (a test-only hook): nothing gets to
    # clean up, as with a kill from outside, but at a point the test can rely on.
    killed = subprocess.run(cmd, env=_env(**{KILL_AFTER_CHUNK_ENV: "2"}), capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    chunks = sorted(p.name for p in (partial_dir(out) / "chunks").glob("chunk-*.npz"))
    assert chunks == ["chunk-000000.npz", "chunk-000001.npz", "chunk-000002.npz"]
    # a half-written chunk of the killed run, as a kill inside np.savez would leave it
    (partial_dir(out) / "chunks" / ".chunk-000003.npz.tmp-12345").write_bytes(b"PK\x03\x04half")

    resumed = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr + resumed.stdout
    assert f"store: {out}" in resumed.stdout
    assert not partial_dir(out).exists()
    assert _store_bytes(out) == _store_bytes(reference.store_dir)
    assert EmbeddingStore.open(out).content_hash == reference.content_hash


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_equal_one(tmp_path, reference):
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", SCRIPT, *ARGS, "--out", str(out)]
    done = subprocess.run(cmd, env=_env(GLOO_SOCKET_IFNAME="lo"), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("store: ") == 1  # only rank 0 reports
    store = EmbeddingStore.open(out)
    assert store.meta["world_size"] == 2
    assert _store_bytes(out) == _store_bytes(reference.store_dir)
    assert store.content_hash == reference.content_hash


def test_script_requires_weights_for_the_digits_cnn(tmp_path):
    done = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "s")], env=_env(),
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert "scripts/train_backbone.py" in done.stderr and "--weights random" in done.stderr
    assert not (tmp_path / "s").exists()
