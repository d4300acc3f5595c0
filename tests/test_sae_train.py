"""SAE training: batch streaming, dead-latent rules, schedules, the training loop and the train_sae script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sae.train as train_mod
from artifacts import ArtifactError, partial_dir
from embeddings.store import write_store
from sae.batches import BatchStream, choose_rows, heldout_split
from sae.checkpoint import load_sae
from sae.config import SAEConfig
from sae.dead import CumulativeDeadTracker, WindowDeadTracker, firing_counts
from sae.schedule import TrainPlan, k_at, lr_at
from sae.train import RunConfig, TrainConfig, default_shape, train_sae
from sae.train_state import load_checkpoint
from sae.trainer import KILL_ENV
from script_runner import run_script_in_process

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_sae.py"
QUIET = RunConfig(progress=False, checkpoint_every=0, log_every=5)


def blobs(n: int = 400, d: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32)


class Interrupted(Exception):
    pass


def interrupt_at(monkeypatch, step: int) -> None:
    """Make the test-only kill hook raise instead of killing the test process."""

    def fake_kill(pid, sig):
        raise Interrupted

    monkeypatch.setenv(KILL_ENV, str(step))
    monkeypatch.setattr(train_mod.os, "kill", fake_kill)


# --------------------------------------------------------------------------------------------- streaming
def epoch_rows(stream: BatchStream, n_batches: int) -> list[np.ndarray]:
    return [stream.next_rows()[0] for _ in range(n_batches)]


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 60),
    batch_size=st.integers(1, 20),
    world_size=st.integers(1, 3),
    seed=st.integers(0, 5),
    restrict=st.booleans(),
)
def test_every_row_visited_once_per_epoch_across_ranks(n, batch_size, world_size, seed, restrict):
    x = np.zeros((n, 2), dtype=np.float32)
    rows = np.arange(0, n, 2) if restrict else None
    expected = np.arange(n) if rows is None else rows
    streams = [BatchStream(x, batch_size, rows=rows, seed=seed, rank=r, world_size=world_size) for r in range(world_size)]
    for epoch in range(2):
        seen = []
        for _ in range(streams[0].n_batches_per_epoch):
            parts = [s.next_rows() for s in streams]
            n_global = parts[0][1]
            assert sum(p[0].size for p in parts) == n_global <= batch_size
            assert all(p[2] == epoch for p in parts)
            for local, _, _ in parts:
                assert np.all(np.diff(local) > 0)  # sorted within a batch for locality
                seen.append(local)
        seen = np.concatenate(seen)
        assert np.array_equal(np.sort(seen), expected), "each row exactly once per epoch, only selected rows"
        assert all(s.epoch == epoch + 1 and s.position == 0 for s in streams)


def test_stream_is_seeded_and_epochs_differ():
    x = np.zeros((50, 2), dtype=np.float32)
    a, b, c = (BatchStream(x, 8, seed=s) for s in (3, 3, 4))
    ra, rb, rc = (np.concatenate(epoch_rows(s, 7)) for s in (a, b, c))
    assert np.array_equal(ra, rb)
    assert not np.array_equal(ra, rc)
    assert not np.array_equal(a.order(0), a.order(1))


def test_resumed_stream_continues_identically():
    x = np.arange(90 * 3, dtype=np.float32).reshape(90, 3)
    full = BatchStream(x, 16, seed=1, rows=np.arange(5, 90))
    reference = [full.next_batch() for _ in range(20)]
    first = BatchStream(x, 16, seed=1, rows=np.arange(5, 90))
    for _ in range(9):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = BatchStream(x, 16, seed=1, rows=np.arange(5, 90))
    resumed.load_state_dict(state)
    for ref in reference[9:]:
        got = resumed.next_batch()
        assert np.array_equal(got.rows, ref.rows) and np.array_equal(got.x, ref.x)
        assert np.array_equal(got.x, x[got.rows])
    other = BatchStream(x, 8, seed=1, rows=np.arange(5, 90))
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)


def test_stream_reads_float16_memmap_and_names_nan_rows(tmp_path):
    x = np.memmap(tmp_path / "x.npy", dtype=np.float16, mode="w+", shape=(30, 4))
    x[:] = 1.0
    x[17, 2] = np.nan
    x.flush()
    stream = BatchStream(np.memmap(tmp_path / "x.npy", dtype=np.float16, mode="r", shape=(30, 4)), 30)
    with pytest.raises(ValueError, match=r"rows \[17\]"):
        stream.next_batch()
    ok = BatchStream(x, 10, rows=np.arange(10))
    assert ok.next_batch().x.dtype == np.float32


def test_choose_rows_prefers_train_and_val_and_holds_out_otherwise():
    split = {"train": np.arange(0, 60), "val": np.arange(60, 80), "test": np.arange(80, 100)}
    train, held, name = choose_rows(100, split)
    assert np.array_equal(train, np.arange(60)) and np.array_equal(held, np.arange(60, 80)) and name == "val"
    train, held, name = choose_rows(100, {"train": split["train"], "test": split["test"]})
    assert name == "test" and np.array_equal(held, split["test"])
    train, held, name = choose_rows(100, {})
    assert np.intersect1d(train, held).size == 0 and train.size + held.size == 100 and held.size == 5
    with pytest.raises(ValueError, match="--split 'nope'"):
        choose_rows(100, split, "nope")
    a, b = heldout_split(40, 0.25, seed=2), heldout_split(40, 0.25, seed=2)
    assert np.array_equal(a[1], b[1]) and a[1].size == 10


@pytest.mark.slow
def test_stream_memory_does_not_grow_with_store_size(tmp_path):
    """Anonymous memory (RssAnon: excludes the memory map's file pages) while streaming batches and training
    a few steps: a 2 GiB sparse memmap costs about as much as a 32 MiB one, beyond the 8-byte row index."""
    code = textwrap.dedent(
        """
        import sys, threading, time, numpy as np
        from sae.config import SAEConfig
        from sae.train import RunConfig, TrainConfig, train_sae
        def anon():
            for line in open('/proc/self/status'):
                if line.startswith('RssAnon:'):
                    return int(line.split()[1]) * 1024
        path, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
        x = np.lib.format.open_memmap(path, mode='w+', dtype=np.float32, shape=(n, 128))  # sparse: zeros
        x[::max(n // 1000, 1)] = 1.0  # some variance
        x.flush(); del x
        x = np.load(path, mmap_mode='r')
        peak, stop = [0], []
        base = anon()
        def watch():
            while not stop:
                peak[0] = max(peak[0], anon()); time.sleep(0.005)
        t = threading.Thread(target=watch); t.start()
        train_sae(x, out, SAEConfig(128, 256, 8), TrainConfig(n_steps=30, batch_size=4096, n_init_samples=2048),
                  RunConfig(progress=False, checkpoint_every=0))
        stop.append(1); t.join()
        print(peak[0] - base)
        """
    )
    growth = {}
    for n in (1 << 16, 1 << 22):
        res = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / f"x{n}.npy"), str(n), str(tmp_path / f"sae{n}")],
            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True,
        )
        growth[n] = int(res.stdout.strip().splitlines()[-1])
    data_bytes = (1 << 22) * 128 * 4
    # The large run may add its permutation and row index (2 x 8 bytes per row), nothing proportional to n*d.
    assert growth[1 << 22] - growth[1 << 16] < 16 * (1 << 22) + 48 * 2**20, growth
    assert growth[1 << 22] < data_bytes / 8, growth


# --------------------------------------------------------------------------------------------- dead latents
def test_window_rule_kills_after_window_and_revives_on_firing():
    tr = WindowDeadTracker(n_latents=3, window_samples=100)
    fires = torch.tensor([1, 0, 0])
    for _ in range(4):  # 4 batches of 30 samples: latents 1 and 2 silent for 120 >= 100 samples
        tr.update(fires, 30)
    assert tr.dead_mask().tolist() == [False, True, True]
    tr2 = WindowDeadTracker(n_latents=3, window_samples=100)
    for _ in range(3):  # 90 samples: not yet a full window
        tr2.update(fires, 30)
    assert not tr2.dead_mask().any()
    tr.update(torch.tensor([0, 2, 0]), 30)  # latent 1 fires again: alive at once; latent 0 now silent 30
    assert tr.dead_mask().tolist() == [False, False, True]
    for _ in range(2):  # latent 0 silent for 30 + 60 = 90 samples: still inside the window
        tr.update(torch.tensor([0, 1, 0]), 30)
    assert tr.dead_mask().tolist() == [False, False, True]
    tr.update(torch.tensor([0, 1, 0]), 30)  # 120 silent samples: dead
    assert tr.dead_mask().tolist() == [True, False, True]


def test_window_counts_samples_not_steps_or_since_start():
    tr = WindowDeadTracker(n_latents=2, window_samples=10)
    for _ in range(50):
        tr.update(torch.tensor([1, 1]), 1000)  # long history of firing
    tr.update(torch.tensor([1, 0]), 9)
    assert not tr.dead_mask()[1]  # silent 9 < 10 samples: a long history does not matter, the window does
    tr.update(torch.tensor([1, 0]), 1)
    assert tr.dead_mask()[1]


def test_paper_rule_is_cumulative_frequency_below_threshold():
    tr = CumulativeDeadTracker(n_latents=3, threshold=1e-2)
    assert not tr.dead_mask().any()
    tr.update(torch.tensor([50, 1, 0]), 100)  # freqs 0.5, 0.01, 0
    assert tr.dead_mask().tolist() == [False, False, True]
    tr.update(torch.tensor([50, 0, 5]), 100)  # cumulative: 100/200, 1/200 = 0.005 < 0.01, 5/200 = 0.025
    assert tr.dead_mask().tolist() == [False, True, False]
    state = tr.state_dict()
    tr3 = CumulativeDeadTracker(n_latents=3, threshold=1e-2)
    tr3.load_state_dict(state)
    assert torch.equal(tr3.dead_mask(), tr.dead_mask()) and tr3.n_seen == 200


def test_firing_counts_count_positive_values_only():
    idx = torch.tensor([[0, 2], [2, 1]])
    val = torch.tensor([[1.0, 0.0], [0.5, 0.2]])
    assert firing_counts(idx, val > 0, 4).tolist() == [1, 1, 1, 0]


# --------------------------------------------------------------------------------------------- schedules
def test_config_validation_names_flags():
    with pytest.raises(ValueError, match="--steps or --epochs"):
        TrainConfig(n_steps=10, n_epochs=1.0)
    with pytest.raises(ValueError, match="--lr-decay"):
        TrainConfig(lr_decay="step")
    with pytest.raises(ValueError, match="--batch-size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="--checkpoint-every"):
        RunConfig(checkpoint_every=-1)


def test_default_shape_is_the_papers_for_clip_and_capped_for_small_data():
    assert default_shape(512, 1_231_167) == (4096, 16)
    assert default_shape(512) == (4096, 16)
    assert default_shape(200, 1079) == (128, 6)
    assert default_shape(24, 100) == (64, 4)


def test_plan_defaults_scale_with_data_and_match_the_paper_at_scale():
    paper = TrainConfig().plan(1_231_167, SAEConfig(512, 4096, 16))
    assert paper.batch_size == 4096 and paper.k_start == 128
    assert paper.n_steps == 100 * 301 and paper.k_anneal_steps == 10_000 and paper.lr_warmup_steps == 5000
    assert paper.dead_window_samples == 1_231_167
    small = TrainConfig(n_steps=300).plan(1000, SAEConfig(64, 512, 4))
    # A run of 38k samples is 0.03% of the paper's: no k annealing or warm-up to speak of.
    assert small.batch_size == 128 and small.k_anneal_steps == 0 and small.lr_warmup_steps == 0
    assert small.k_start == 32 and small.dead_window_samples == 1000
    # A tenth of the paper's run in samples: a tenth of its fractions (a third, a sixth) of the steps.
    tenth = TrainConfig(n_steps=3010, batch_size=4096).plan(1_231_167, SAEConfig(512, 4096, 16))
    assert tenth.k_anneal_steps == 100 and tenth.lr_warmup_steps == 50
    long = TrainConfig(n_steps=60_000, batch_size=4096).plan(1_231_167, SAEConfig(512, 4096, 16))
    assert long.k_anneal_steps == 10_000 and long.lr_warmup_steps == 5000  # capped at the paper's samples
    assert TrainConfig(k_anneal_steps=7, lr_warmup_steps=3).plan(1000, SAEConfig(64, 512, 4)).k_anneal_steps == 7
    assert TrainConfig(n_epochs=2.0, batch_size=100).plan(1000, SAEConfig(8, 16, 2)).n_steps == 20


def test_lr_warms_up_then_decays_linearly_to_zero():
    cfg = TrainConfig(n_steps=100, lr=1.0, lr_warmup_steps=10)
    plan = cfg.plan(1000, SAEConfig(8, 16, 2))
    lrs = [lr_at(s, 1.0, plan, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in lrs[10:80])
    assert np.all(np.diff(lrs[80:]) < 0) and lrs[99] == pytest.approx(1 / 20)
    cos = TrainConfig(n_steps=100, lr=1.0, lr_warmup_steps=0, lr_decay="cosine")
    cplan = cos.plan(1000, SAEConfig(8, 16, 2))
    assert lr_at(0, 1.0, cplan, cos) == 1.0 and lr_at(50, 1.0, cplan, cos) == pytest.approx(0.5)


@settings(max_examples=30, deadline=None)
@given(
    n_steps=st.integers(1, 400),
    warmup=st.one_of(st.none(), st.integers(0, 100)),
    decay=st.sampled_from(["linear", "cosine", "none"]),
)
def test_lr_schedule_stays_within_peak_and_warms_up_monotonically(n_steps, warmup, decay):
    cfg = TrainConfig(n_steps=n_steps, lr=2.0, lr_warmup_steps=warmup, lr_decay=decay)
    plan = cfg.plan(10_000, SAEConfig(8, 64, 4))
    lrs = np.array([lr_at(s, 2.0, plan, cfg) for s in range(n_steps)])
    assert np.all(lrs > 0) and np.all(lrs <= 2.0 + 1e-12)
    decay_start = n_steps - int(round(cfg.lr_decay_fraction * n_steps)) if decay == "linear" else n_steps
    assert np.all(np.diff(lrs[: min(plan.lr_warmup_steps, decay_start)]) > 0)  # warm-up rises until decay
    if decay == "none" and n_steps > plan.lr_warmup_steps:
        assert lrs[-1] == 2.0
    ks = [k_at(s, 4, plan) for s in range(n_steps)]
    assert ks[0] == (plan.k_start if plan.k_anneal_steps > 0 else 4) and all(4 <= k <= plan.k_start for k in ks)


def test_k_anneals_from_k_start_to_k():
    plan = TrainPlan(batch_size=8, n_steps=100, lr_warmup_steps=0, k_start=128, k_anneal_steps=40, dead_window_samples=8)
    ks = [k_at(s, 16, plan) for s in range(100)]
    assert ks[0] == 128 and ks[40:] == [16] * 60 and ks[20] == 72
    assert all(a >= b for a, b in zip(ks, ks[1:]))


# --------------------------------------------------------------------------------------------- training loop
def test_training_reduces_fvu_and_writes_a_loadable_sae(tmp_path):
    x = blobs()
    result = train_sae(
        x, tmp_path / "sae", SAEConfig(16, 64, 4), TrainConfig(n_steps=60, batch_size=64, k_anneal_steps=20), QUIET,
        train_rows=np.arange(350), heldout_rows=np.arange(350, 400), parent_store_hash="abc",
    )
    hist = result.history
    assert hist[-1]["fvu"] < hist[0]["fvu"] and hist[-1]["k"] == 4 and hist[0]["k"] > 4
    assert [h["step"] for h in hist] == list(range(5, 61, 5))
    model = load_sae(tmp_path / "sae")
    norms = model.W_dec.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)  # unit decoder rows after training
    config = json.loads((tmp_path / "sae" / "config.json").read_text())
    assert config["parent_store_hash"] == "abc" and config["train"]["n_steps"] == 60
    assert 0 < config["metrics"]["heldout"]["fvu"] < 1.0
    metrics = json.loads((tmp_path / "sae" / "metrics.json").read_text())
    assert len(metrics["history"]) == len(hist) and metrics["plan"]["n_steps"] == 60
    assert not partial_dir(tmp_path / "sae").exists()


def test_paper_variant_and_bf16_train(tmp_path):
    x = blobs(200, 8)
    cfg = SAEConfig.paper(d_in=8, n_latents=32, k=2)
    res = train_sae(x, tmp_path / "p", cfg, TrainConfig(n_steps=20, batch_size=50, precision="bf16"), QUIET)
    assert np.isfinite(res.history[-1]["loss"])
    assert load_sae(tmp_path / "p").config.variant == "paper"


def test_existing_output_and_leftover_checkpoint_are_refused(tmp_path, monkeypatch):
    x = blobs(200, 8)
    args = (x, tmp_path / "s", SAEConfig(8, 32, 2), TrainConfig(n_steps=12, batch_size=40))
    run = RunConfig(progress=False, checkpoint_every=5)
    interrupt_at(monkeypatch, 7)
    with pytest.raises(Interrupted):
        train_sae(*args, run)
    monkeypatch.delenv(KILL_ENV)
    assert (partial_dir(tmp_path / "s") / "checkpoint.pt").is_file()
    with pytest.raises(ArtifactError, match="--resume"):
        train_sae(*args, run)
    with pytest.raises(ArtifactError, match="other settings:\n  lr: checkpoint 0.001, now 0.002"):
        train_sae(x, tmp_path / "s", SAEConfig(8, 32, 2), TrainConfig(n_steps=12, batch_size=40, lr=2e-3), run, resume=True)
    with pytest.raises(ArtifactError, match="was made from store None, not from this store \\(other\\)"):
        train_sae(*args, run, resume=True, parent_store_hash="other")
    with pytest.raises(ArtifactError, match=r"training rows \(rows\)"):
        train_sae(*args, run, resume=True, train_rows=np.arange(150))
    res = train_sae(*args, run, resume=True)
    assert res.resumed_from_step == 5 and [h["step"] for h in res.history][-1] == 12
    with pytest.raises(ArtifactError, match="already exists; pass --overwrite"):
        train_sae(*args, run)
    train_sae(*args, run, overwrite=True)


def test_data_errors_are_clear(tmp_path):
    x = blobs(50, 8)
    with pytest.raises(ValueError, match="d=8 but the SAE config has d_in=9"):
        train_sae(x, tmp_path / "a", SAEConfig(9, 32, 2), TrainConfig(n_steps=2), QUIET)
    x[[3, 41]] = np.nan
    with pytest.raises(ValueError, match=r"NaN or Inf in 2 rows: \[3, 41\]"):
        train_sae(x, tmp_path / "b", SAEConfig(8, 32, 2), TrainConfig(n_steps=2), QUIET)


# --------------------------------------------------------------------------------------------- the script
def run_script(*argv: str, capsys=None) -> tuple[int, str, str]:
    return run_script_in_process(SCRIPT.name, *argv, capsys=capsys)


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 24)).astype(np.float32)
    split = {"train": np.arange(0, 240), "val": np.arange(240, 270), "test": np.arange(270, 300)}
    return write_store(tmp_path / "store", x, labels=rng.integers(0, 3, 300), split=split)


def test_script_trains_a_store_end_to_end(store, tmp_path, capsys):
    code, out, err = run_script(
        "--store", str(store.store_dir), "--out", str(tmp_path / "sae"), "--steps", "40", "--no-progress",
        "--device", "cpu", capsys=capsys,
    )
    assert code == 0, err
    assert str(tmp_path / "sae") in out and "held-out metrics on val" in out
    model = load_sae(tmp_path / "sae")
    assert (model.config.d_in, model.config.n_latents, model.config.k) == (24, 64, 4)  # width capped by rows
    config = json.loads((tmp_path / "sae" / "config.json").read_text())
    assert config["parent_store_hash"] == store.content_hash
    held = config["metrics"]["heldout"]
    assert held["n"] == 30 and 0 < held["fvu"] < 1 and held["l0"] <= 4


def test_script_rejects_bad_flags_with_clear_errors(store, tmp_path, capsys):
    base = ["--store", str(store.store_dir), "--no-progress", "--device", "cpu"]
    code, _, err = run_script(*base, "--out", str(tmp_path / "a"), "--steps", "5", "--epochs", "1", capsys=capsys)
    assert code == 2 and "pass --steps or --epochs, not both" in err
    code, _, err = run_script(*base, "--out", str(tmp_path / "a"), "--k", "500", "--steps", "2", capsys=capsys)
    assert code == 2 and "--k must be in [1, --n-latents=64]" in err
    code, _, err = run_script(*base, "--out", str(tmp_path / "a"), "--split", "nope", capsys=capsys)
    assert code == 2 and "--split 'nope'" in err
    code, _, err = run_script("--store", str(tmp_path / "missing"), "--out", str(tmp_path / "a"), capsys=capsys)
    assert code == 2 and "no embedding store" in err


def test_script_refuses_resume_on_a_store_of_another_width(store, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sae"
    interrupt_at(monkeypatch, 4)
    with pytest.raises(Interrupted):
        run_script("--store", str(store.store_dir), "--out", str(out), "--steps", "10", "--checkpoint-every", "2",
                   "--no-progress", capsys=capsys)
    monkeypatch.delenv(KILL_ENV)
    other = write_store(tmp_path / "store48", np.random.default_rng(1).normal(size=(100, 48)).astype(np.float32))
    code, _, err = run_script("--store", str(other.store_dir), "--out", str(out), "--steps", "10",
                              "--checkpoint-every", "2", "--no-progress", "--resume", capsys=capsys)
    assert code == 2 and "trained on d=24 embeddings but the data has d=48" in err


def test_script_names_nan_rows_of_a_store(tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    store = write_store(tmp_path / "store", x)
    # A store whose embeddings were damaged after it was written (write_store itself refuses NaN).
    emb = np.load(store.store_dir / "embeddings.npy", mmap_mode="r+")
    emb[13, 0] = np.nan
    emb.flush()
    del emb
    code, _, err = run_script("--store", str(store.store_dir), "--out", str(tmp_path / "sae"), "--steps", "3",
                              "--no-progress", capsys=capsys)
    assert code == 2 and "embeddings.npy does not match the SHA-256" in err  # the hash check sees it first
    code, _, err = run_script("--store", str(store.store_dir), "--out", str(tmp_path / "sae"), "--steps", "3",
                              "--no-progress", "--no-verify", capsys=capsys)
    assert code == 2 and "NaN or Inf in 1 rows: [13]" in err


class Batches:
    """A re-iterable batch source (every iteration yields the same batches)."""

    def __init__(self, x: np.ndarray, batch_size: int):
        self.x, self.batch_size = x, batch_size

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.x), self.batch_size):
            yield torch.from_numpy(self.x[start : start + self.batch_size])


def test_batch_source_trains_and_resumes_to_identical_weights(tmp_path, monkeypatch):
    x = blobs(130, 8)
    args = (SAEConfig(8, 32, 2), TrainConfig(n_epochs=3.0, seed=4))
    run = RunConfig(progress=False, checkpoint_every=4, log_every=2)
    ref = train_sae(Batches(x, 30), tmp_path / "ref", *args, run, heldout_x=blobs(20, 8, seed=9))
    assert ref.history[-1]["step"] == 15  # 3 passes of 5 batches
    assert ref.metrics["heldout"]["n"] == 20
    interrupt_at(monkeypatch, 10)
    with pytest.raises(Interrupted):
        train_sae(Batches(x, 30), tmp_path / "b", *args, run, heldout_x=blobs(20, 8, seed=9))
    monkeypatch.delenv(KILL_ENV)
    res = train_sae(Batches(x, 30), tmp_path / "b", *args, run, heldout_x=blobs(20, 8, seed=9), resume=True)
    assert res.resumed_from_step == 8
    a, b = load_sae(tmp_path / "ref"), load_sae(tmp_path / "b")
    for name, p in a.named_parameters():
        assert torch.equal(p, getattr(b, name)), name

    class NoLength:
        def __iter__(self):
            return iter([x])

    with pytest.raises(ValueError, match="needs --steps"):
        train_sae(NoLength(), tmp_path / "c", *args, run)
    with pytest.raises(ValueError, match="must be re-iterable"):
        train_sae((b for b in [x]), tmp_path / "c", SAEConfig(8, 32, 2), TrainConfig(n_steps=3), run)


def test_paper_variant_counts_validation_batches_as_dead_statistics(tmp_path, monkeypatch):
    """The authors' quirk: evaluation also updates the cumulative firing counts (only for ``paper``)."""
    x = blobs(240, 8)
    run = RunConfig(progress=False, checkpoint_every=10, log_every=5, val_every=5)
    for variant, config in (("paper", SAEConfig.paper(d_in=8, n_latents=32, k=2)), ("topk", SAEConfig(8, 32, 2))):
        interrupt_at(monkeypatch, 10)
        out = tmp_path / variant
        with pytest.raises(Interrupted):
            train_sae(x, out, config, TrainConfig(n_steps=20, batch_size=20), run,
                      train_rows=np.arange(200), heldout_rows=np.arange(200, 240))
        state = load_checkpoint(partial_dir(out) / "checkpoint.pt")
        assert [v["step"] for v in state["val_history"]] == [5, 10]
        if variant == "paper":
            assert state["dead"]["n_seen"] == 10 * 20 + 2 * 40  # training samples plus two validations
        else:
            assert state["dead"]["kind"] == "window"
