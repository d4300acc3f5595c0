"""scripts/ttt.py and the TTT study's caches: keyed by every input, locked, checked before the work."""

import json
import os
import socket

import numpy as np
import pytest
import torch

from analysis.run.store_stages import encode_store
from analysis.ttt.study import TTTStudyConfig, check_finite, ttt_study
from embeddings.store import EmbeddingStore
from sae.checkpoint import load_sae, save_sae
from sae.codes import CodeStore
from script_runner import run_script_in_process
from synthetic_concepts import planted_artifacts

SMALL = dict(n_neighbours=10, steps=10, head_epochs=5, sweep_neighbours=(5,), sweep_train_fractions=(1.0,),
             n_locality_queries=4, locality_rows=20, n_mask_queries=10, n_sweep_queries=10, chunk_size=16)
ARGS = ["--n-neighbours", "10", "--steps", "10", "--head-epochs", "5", "--sweep-neighbours", "5",
        "--sweep-train-fractions", "1.0", "--n-locality-queries", "4", "--locality-rows", "20", "--n-mask-queries",
        "10", "--n-sweep-queries", "10", "--chunk-size", "16"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_artifacts(tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="module")
def other_sae(planted, tmp_path_factory):
    """Another SAE of the same shape on the same store (latents permuted and perturbed), and its codes."""
    store_dir, sae_dir, _ = planted
    tmp = tmp_path_factory.mktemp("other")
    model = load_sae(sae_dir)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        model.W_dec.add_(0.5 * torch.randn(model.W_dec.shape, generator=g))
        model.W_enc.copy_(model.W_dec.T)
    save_sae(model, tmp / "sae", parent_store_hash=EmbeddingStore.open(store_dir).content_hash)
    encode_store(store_dir, tmp / "sae", tmp / "codes")
    return tmp / "sae", tmp / "codes"


def _study(store_dir, sae_dir, codes_dir, out, cache):
    config = TTTStudyConfig(**SMALL, space="reconstructions")
    return ttt_study(EmbeddingStore.open(store_dir), load_sae(sae_dir), CodeStore.open(codes_dir), config, out,
                     cache_dir=cache)


def test_a_resumed_study_with_another_sae_does_not_reuse_the_old_head_or_chunks(planted, other_sae, tmp_path):
    store_dir, sae_dir, codes_dir = planted
    _study(store_dir, sae_dir, codes_dir, tmp_path / "a", tmp_path / "cache")
    resumed = _study(store_dir, *other_sae, tmp_path / "b", tmp_path / "cache")
    fresh = _study(store_dir, *other_sae, tmp_path / "c", tmp_path / "fresh")
    for key in ("global_acc", "ttt_acc", "majority_acc"):
        assert resumed["ttt"][key] == fresh["ttt"][key], key
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the other inputs' head and chunks are gone


def test_a_head_that_never_trained_and_nan_features_are_refused():
    with pytest.raises(ValueError, match="--head-epochs must be >= 1"):
        TTTStudyConfig(head_epochs=0)
    x = np.ones((5, 3), np.float32)
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf, first in row 13"):
        check_finite(x, np.arange(10, 15), "the embeddings of store S")


def _script(planted, out, *extra, capsys):
    store, sae, codes = planted
    return run_script_in_process("ttt.py", "--store", str(store), "--sae", str(sae), "--codes", str(codes), "--out",
                                 str(out), *ARGS, *extra, capsys=capsys)


def test_rerunning_a_finished_evaluation_reports_it_complete(planted, tmp_path, capsys):
    out = tmp_path / "out"
    rc, first, err = _script(planted, out, capsys=capsys)
    assert rc == 0, err
    rc, again, err = _script(planted, out, capsys=capsys)
    assert rc == 0 and "already complete" in again and "global head" in again, err
    rc, _, err = _script(planted, out, "--steps", "3", capsys=capsys)
    assert rc == 2 and "already exists; pass --overwrite" in err


def test_a_foreign_out_or_a_held_lock_is_refused_before_any_work(planted, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    rc, _, err = _script(planted, mine, capsys=capsys)
    assert rc == 2 and "not an artifact of this toolkit" in err
    assert not (tmp_path / ".mine.partial").exists() and (mine / "notes.txt").read_text() == "keep"
    out = tmp_path / "out"
    holder = {"pid": os.getppid(), "host": socket.gethostname(), "start_ticks": None, "since": "now"}
    (tmp_path / ".out.lock").write_text(json.dumps(holder))
    rc, _, err = _script(planted, out, capsys=capsys)
    assert rc == 2 and f"pid {os.getppid()}" in err and not out.exists()
