"""The default digits run end to end: every stage's artifact, the summary, and reuse on a rerun."""

import json

import numpy as np
import pytest

from analysis.pipeline import DigitsRunConfig, run_digits
from analysis.stages import encode_store, sae_config_for_store
from embeddings.digits import digits_split, load_digits_images
from embeddings.store import EmbeddingStore
from sae.checkpoint import load_sae
from sae.codes import CodeStore

SMALL = DigitsRunConfig(cnn_width=2, cnn_epochs=2, sae_epochs=3)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("digits")
    return out_dir, run_digits(out_dir, SMALL)


def test_every_stage_writes_a_loadable_artifact(digits_run):
    out_dir, summary = digits_run
    store = EmbeddingStore.open(out_dir / "store")
    assert store.n == 1797 and store.d == 2 * 25
    sae = load_sae(out_dir / "sae")
    assert sae.config.d_in == store.d
    codes = CodeStore.open(out_dir / "codes")
    assert codes.n == store.n and codes.k == sae.config.k
    assert json.loads((out_dir / "summary.json").read_text()) == summary
    assert summary["store"]["content_hash"] == store.content_hash
    assert 0.0 <= summary["sae"]["heldout"]["fvu"] < 1.0


def test_store_split_is_the_split_the_backbone_was_trained_on(digits_run):
    out_dir, _ = digits_run
    store = EmbeddingStore.open(out_dir / "store")
    _, labels = load_digits_images()
    expected = digits_split(labels, seed=SMALL.seed)
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(np.sort(store.split[name]), np.sort(expected[name]))
    np.testing.assert_array_equal(store.labels, labels)


def test_rerun_reuses_completed_stages(digits_run):
    out_dir, summary = digits_run
    weights = out_dir / "sae" / "sae.safetensors"
    before = weights.stat().st_mtime_ns
    again = run_digits(out_dir, SMALL)
    assert weights.stat().st_mtime_ns == before
    assert again["store"]["content_hash"] == summary["store"]["content_hash"]
    assert again["sae"] == summary["sae"]


def test_encode_store_refuses_an_sae_of_another_width(digits_run, tmp_path):
    out_dir, _ = digits_run
    from sae.checkpoint import save_sae
    from sae.model import TopKSAE

    other = tmp_path / "other_sae"
    save_sae(TopKSAE(sae_config_for_store(7, n_latents=16, k=2)), other, train_config=None,
             parent_store_hash=None, metrics=None)
    with pytest.raises(Exception, match="7"):
        encode_store(out_dir / "store", other, tmp_path / "codes")
    assert not (tmp_path / "codes").exists()


def test_config_validation_names_the_flag():
    with pytest.raises(ValueError, match="--sae-epochs"):
        DigitsRunConfig(sae_epochs=0)
