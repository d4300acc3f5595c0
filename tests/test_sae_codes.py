"""CodeStore: encoding a whole array, inverted lists, memory maps, bad inputs, the encode script."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from artifacts import ArtifactError, read_json
from sae.checkpoint import save_sae
from sae.codes import CodeStore, encode_array
from sae.config import SAEConfig
from sae.model import TopKSAE


def small_model(d=5, n=12, k=3, variant="topk"):
    config = SAEConfig(d, n, k) if variant == "topk" else SAEConfig.paper(d, n, k)
    model = TopKSAE(config)
    with torch.no_grad():
        model.b_enc.normal_(0.0, 0.3)
    return model.eval()


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 40), st.integers(1, 7), st.sampled_from(["topk", "paper"]), st.integers(0, 1000))
def test_round_trip_and_inverted_lists(tmp_path_factory, n, batch_size, variant, seed):
    tmp = tmp_path_factory.mktemp("codes")
    torch.manual_seed(seed)
    model = small_model(variant=variant)
    x = np.random.default_rng(seed).normal(size=(n, 5)).astype(np.float32)
    np.save(tmp / "x.npy", x)
    x_mm = np.load(tmp / "x.npy", mmap_mode="r")
    codes = encode_array(model, x_mm, tmp / "codes", batch_size=batch_size, parents={"sae_hash": "s", "store_hash": "t"})
    assert isinstance(codes.indices, np.memmap) and isinstance(codes.inv_rows, np.memmap)
    assert codes.indices.dtype == np.int32 and codes.values.dtype == np.float32
    assert (codes.n, codes.k, codes.n_latents) == (n, 3, 12)
    with torch.no_grad():
        values, indices = model.encode(torch.from_numpy(x))
    np.testing.assert_allclose(codes.values, values.numpy(), rtol=1e-6, atol=1e-6)
    assert np.array_equal(codes.indices, indices.numpy())
    assert (np.diff(codes.values, axis=1) <= 0).all()
    # Inverted lists are exactly the transpose of the codes, rows ascending per latent.
    for latent in range(codes.n_latents):
        rows = codes.rows_of(latent)
        assert (np.diff(rows) > 0).all()
        expected = np.nonzero((codes.indices == latent).any(1))[0]
        assert np.array_equal(rows, expected)
    assert codes.counts().sum() == n * 3
    meta = read_json(tmp / "codes" / "meta.json")
    assert meta["sae_hash"] == "s" and meta["store_hash"] == "t" and meta["n"] == n
    reopened = CodeStore.open(tmp / "codes")
    v, i = reopened.codes([0])
    assert np.array_equal(i, codes.indices[[0]])
    dense = reopened.dense([0])
    assert dense.shape == (1, 12) and np.allclose(dense[0, i[0]], v[0])


def test_bad_rows_are_named_and_nothing_is_committed(tmp_path):
    x = np.random.default_rng(0).normal(size=(10, 5)).astype(np.float32)
    x[3, 1] = np.nan
    x[8, 0] = np.inf
    with pytest.raises(ArtifactError, match=r"rows \[3, 8\]"):
        encode_array(small_model(), x, tmp_path / "codes", batch_size=4)
    assert not (tmp_path / "codes").exists() and not (tmp_path / ".codes.partial").exists()


def test_refuses_width_mismatch_and_existing_dir(tmp_path):
    x = np.zeros((4, 6), dtype=np.float32)
    with pytest.raises(ArtifactError, match="d_in=5.*d=6"):
        encode_array(small_model(), x, tmp_path / "codes")
    x = np.ones((4, 5), dtype=np.float32)
    encode_array(small_model(), x, tmp_path / "codes")
    with pytest.raises(ArtifactError, match="--overwrite"):
        encode_array(small_model(), x, tmp_path / "codes")
    encode_array(small_model(), x, tmp_path / "codes", overwrite=True)
    with pytest.raises(ArtifactError, match="encode.py"):
        CodeStore.open(tmp_path / "missing")


def run_script(*args):
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, str(root / "scripts" / "encode.py"), *args], capture_output=True, text=True)


def test_encode_script_on_a_store(tmp_path):
    from embeddings.store import write_store

    rng = np.random.default_rng(1)
    store = write_store(tmp_path / "store", rng.normal(size=(20, 5)).astype(np.float32))
    save_sae(small_model(), tmp_path / "sae")
    done = run_script("--store", str(tmp_path / "store"), "--sae", str(tmp_path / "sae"), "--out", str(tmp_path / "codes"),
                      "--batch-size", "7")
    assert done.returncode == 0, done.stderr
    assert str(tmp_path / "codes") in done.stdout
    codes = CodeStore.open(tmp_path / "codes")
    assert codes.n == 20 and codes.meta["store_hash"] == store.content_hash
    assert len(codes.meta["sae_hash"]) == 64
    save_sae(TopKSAE(SAEConfig(6, 12, 3)), tmp_path / "sae6")
    done = run_script("--store", str(tmp_path / "store"), "--sae", str(tmp_path / "sae6"), "--out", str(tmp_path / "c2"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    err = done.stderr
    assert "sae6" in err and "store" in err and "d=5" in err


# ------------------------------------------------------------------------------------------- damaged and crafted files


@pytest.fixture
def codes_dir(tmp_path):
    x = np.random.default_rng(0).normal(size=(10, 5)).astype(np.float32)
    encode_array(small_model(), x, tmp_path / "codes", batch_size=4, parents={"store_dir": "S", "sae_dir": "A"})
    return tmp_path / "codes"


def _set_index(codes_dir, value):
    indices = np.load(codes_dir / "indices.npy")
    indices[4, 1] = value
    np.save(codes_dir / "indices.npy", indices)


@pytest.mark.parametrize("edit, match", [
    (lambda d: (d / "values.npy").write_bytes((d / "values.npy").read_bytes()[:-12]),
     r"values\.npy is truncated: \d+ bytes where its header \(float32 \(10, 3\)\) needs \d+"),
    (lambda d: _set_index(d, 12), r"indices\.npy holds latent index 12 at entry 13, outside 0\.\.11"),
    (lambda d: _set_index(d, -3), r"indices\.npy holds latent index -3 at entry 13, outside 0\.\.11"),
    (lambda d: np.save(d / "indices.npy", np.load(d / "indices.npy").astype(np.float32)),
     r"indices\.npy holds float32 where integers or unsigned integers belong"),
    (lambda d: np.save(d / "inv_indptr.npy", np.arange(13) * 100),
     r"inv_indptr\.npy is not the pointer array of 30 entries"),
    (lambda d: (d / "meta.json").write_text("[1, 2]"), r"meta\.json holds a JSON list where a JSON object belongs"),
    (lambda d: (d / "config.json").write_text("{"), r"config\.json is not valid JSON"),
])
def test_damaged_codes_are_refused_naming_the_file_and_the_fix(codes_dir, edit, match):
    edit(codes_dir)
    with pytest.raises(ArtifactError, match=match) as info:
        CodeStore.open(codes_dir)
    assert "scripts/encode.py --store " in str(info.value) and f"--out {codes_dir} --overwrite" in str(info.value)


def test_an_object_array_is_refused_without_advice_to_unpickle(codes_dir):
    np.save(codes_dir / "values.npy", np.array([[object()] * 3] * 10, dtype=object), allow_pickle=True)
    with pytest.raises(ArtifactError, match=r"values\.npy holds Python objects") as info:
        CodeStore.open(codes_dir)
    assert "allow_pickle" not in str(info.value) and "pickle=True" not in str(info.value)


def test_a_full_disk_while_encoding_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    import errno
    import os

    from artifacts import DiskFullError, lock_path

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    x = np.ones((6, 5), np.float32)
    with pytest.raises(DiskFullError, match=r"No space left on device while writing .*\.codes\.partial/indices\.npy "
                                            r"\(it needs \d+ bytes\) \(encoding the codes\)"):
        encode_array(small_model(), x, tmp_path / "codes")
    assert not (tmp_path / "codes").exists() and not (tmp_path / ".codes.partial").exists()
    assert not lock_path(tmp_path / "codes").exists()
