"""Resume after a real SIGKILL: the final weights equal an uninterrupted run's, bitwise (CPU, fixed seed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from artifacts import partial_dir
from embeddings.store import write_store
from sae.train_state import CHECKPOINT_NAME, load_checkpoint
from sae.trainer import KILL_ENV

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_sae.py"


def run(args: list[str], kill_after: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(KILL_ENV, None)
    if kill_after is not None:
        env[KILL_ENV] = str(kill_after)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 16)).astype(np.float32)
    split = {"train": np.arange(450), "val": np.arange(450, 500)}
    return write_store(tmp_path_factory.mktemp("resume") / "store", x, split=split)


def common(store, out: Path, variant: str = "topk") -> list[str]:
    # 80 steps of 64 rows: 7 batches per epoch with a partial last one, k annealing, LR warm-up and decay,
    # dead latents (a short window), all across the interruption.
    return [
        "--store", str(store.store_dir), "--out", str(out), "--steps", "80", "--batch-size", "64",
        "--n-latents", "96", "--k", "3", "--dead-window", "200", "--checkpoint-every", "20", "--no-progress",
        "--seed", "3", "--device", "cpu", "--variant", variant,
    ]


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "sae"
    res = run(common(store, out))
    assert res.returncode == 0, res.stderr
    return out


def assert_bitwise_equal(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "sae.safetensors")), load_file(str(b / "sae.safetensors"))
    assert ta.keys() == tb.keys()
    for name in ta:
        assert np.array_equal(ta[name].view(np.uint32), tb[name].view(np.uint32)), name
    assert (a / "sae.safetensors").read_bytes() == (b / "sae.safetensors").read_bytes()


@pytest.mark.parametrize("kill_after", [47, pytest.param(40, marks=pytest.mark.slow)])
def test_sigkill_then_resume_is_bitwise_identical(store, reference, tmp_path, kill_after):
    """47: killed between checkpoints (steps 41..47 are redone); 40: killed right after writing one."""
    out = tmp_path / "sae"
    killed = run(common(store, out), kill_after=kill_after)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    ckpt = load_checkpoint(partial_dir(out) / CHECKPOINT_NAME)
    assert ckpt["step"] == 40
    resumed = run(common(store, out) + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert_bitwise_equal(reference, out)
    assert not partial_dir(out).exists()


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_usable(store, reference, tmp_path):
    """A kill inside ``torch.save`` leaves a truncated temporary file beside the last complete checkpoint (the
    write goes to a temporary sibling, then a rename); resume must use the checkpoint and ignore the debris."""
    out = tmp_path / "sae"
    assert run(common(store, out), kill_after=47).returncode == -signal.SIGKILL
    work = partial_dir(out)
    complete = (work / CHECKPOINT_NAME).read_bytes()
    debris = work / f".{CHECKPOINT_NAME}.tmp-999999"
    debris.write_bytes(complete[: len(complete) // 3])  # the next checkpoint, cut off mid-write
    resumed = run(common(store, out) + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert_bitwise_equal(reference, out)
    assert not work.exists() and not any(".tmp-" in p.name for p in out.iterdir())


@pytest.mark.slow
def test_paper_variant_with_dropout_resumes_bitwise(store, tmp_path):
    """The paper variant draws dropout masks: the torch RNG state must travel with the checkpoint."""
    ref, out = tmp_path / "ref", tmp_path / "sae"
    assert run(common(store, ref, "paper")).returncode == 0
    assert run(common(store, out, "paper"), kill_after=55).returncode == -signal.SIGKILL
    assert run(common(store, out, "paper") + ["--resume"]).returncode == 0
    assert_bitwise_equal(ref, out)


@pytest.mark.slow
def test_resume_without_checkpoint_starts_fresh_and_rerun_needs_a_flag(store, reference, tmp_path):
    out = tmp_path / "sae"
    killed = run(common(store, out), kill_after=5)  # before the first checkpoint
    assert killed.returncode == -signal.SIGKILL
    plain = run(common(store, out))
    assert plain.returncode == 2 and "pass --resume or --overwrite" in plain.stderr
    resumed = run(common(store, out) + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert_bitwise_equal(reference, out)


def test_a_damaged_or_pickled_checkpoint_is_refused_without_unpickling_advice(tmp_path):
    from fractions import Fraction

    import torch

    from artifacts import ArtifactError

    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a checkpoint")
    pickled = tmp_path / "pickled.pt"
    torch.save({"step": 3, "ratio": Fraction(1, 2)}, pickled)
    for path in (damaged, pickled):
        with pytest.raises(ArtifactError, match=str(path)) as e:
            load_checkpoint(path)
        assert "weights_only" not in str(e.value) and "--overwrite" in str(e.value)
