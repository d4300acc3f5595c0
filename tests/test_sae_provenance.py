"""Every SAE records what it was trained on and its per-latent firing frequency; a store made otherwise warns."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from analysis.run.store_stages import encode_store, train_sae_on_store
from embeddings.store import write_store
from sae.checkpoint import read_latent_frequency, read_provenance
from sae.codes import CodeStore
from sae.config import SAEConfig
from sae.provenance import (
    PAPER_PROVENANCE,
    ProvenanceWarning,
    provenance_differences,
    store_provenance,
    warn_if_different,
)
from sae.train import RunConfig, TrainConfig

QUIET = RunConfig(progress=False, checkpoint_every=0, log_every=5)
CLIP_META = {
    "backbone": "vit_base_patch16_clip_224.openai", "output_kind": "head", "normalize": True, "d": 16,
    "preprocessing": {"input_size": [3, 224, 224], "interpolation": "bicubic", "mean": [0.48145466, 0.4578275,
                      0.40821073], "std": [0.26862954, 0.26130258, 0.27577711], "crop_pct": 1.0, "crop_mode": "center"},
}


def make_store(path, meta, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, 16)).astype(np.float32)
    split = {"train": np.arange(160), "val": np.arange(160, 200)}
    return write_store(path, x, labels=rng.integers(0, 3, 200), split=split, meta=meta)


def test_training_on_a_store_records_its_provenance_and_firing_frequency(tmp_path):
    store = make_store(tmp_path / "store", CLIP_META)
    result, _ = train_sae_on_store(store, tmp_path / "sae", SAEConfig(16, 32, 4), TrainConfig(n_steps=20), QUIET)
    prov = read_provenance(tmp_path / "sae")
    assert prov == store_provenance(store.meta)
    assert prov["backbone"] == "vit_base_patch16_clip_224.openai" and prov["normalize"] is True and prov["d"] == 16
    freq = read_latent_frequency(tmp_path / "sae")
    assert freq.shape == (32,) and np.all((freq >= 0) & (freq <= 1))
    # Each held-out row fires at most k latents, so the frequencies sum to the held-out L0.
    assert freq.sum() == pytest.approx(result.metrics["heldout"]["l0"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProvenanceWarning)  # the same store: no warning
        codes = encode_store(store.store_dir, tmp_path / "sae", tmp_path / "codes")
    fired = np.bincount(np.asarray(codes.indices)[np.asarray(codes.values) > 0], minlength=32) / codes.n
    np.testing.assert_allclose(np.load(tmp_path / "codes" / "latent_frequency.npy"), fired)
    assert isinstance(codes, CodeStore)


def test_encoding_a_store_made_otherwise_warns_naming_the_differences(tmp_path):
    store = make_store(tmp_path / "store", CLIP_META)
    train_sae_on_store(store, tmp_path / "sae", SAEConfig(16, 32, 4), TrainConfig(n_steps=5), QUIET)
    other = make_store(tmp_path / "other", {**CLIP_META, "backbone": "resnet50", "normalize": False}, seed=1)
    with pytest.warns(ProvenanceWarning, match="backbone: SAE trained on 'vit_base_patch16_clip_224.openai', store "
                                               "has 'resnet50'") as record:
        encode_store(other.store_dir, tmp_path / "sae", tmp_path / "codes")
    assert "normalize: SAE trained on True, store has False" in str(record[0].message)


def test_differences_compare_only_what_both_records_know():
    clip = store_provenance(CLIP_META)
    assert provenance_differences(clip, clip) == []
    assert provenance_differences(None, clip) == [] and provenance_differences(clip, {}) == []
    float32_mean = {**CLIP_META["preprocessing"], "mean": [float(np.float32(v)) for v in CLIP_META["preprocessing"]["mean"]]}
    assert provenance_differences(clip, {**clip, "preprocessing": float32_mean}) == []
    bicubic = {**CLIP_META["preprocessing"], "interpolation": "bilinear"}
    assert provenance_differences(clip, {**clip, "preprocessing": bicubic}) == [
        "preprocessing.interpolation: SAE trained on 'bicubic', store has 'bilinear'"]
    assert provenance_differences(clip, {**clip, "backbone": None, "output_kind": "pre_logits"}) == [
        "output_kind: SAE trained on 'head', store has 'pre_logits'"]


def test_the_authors_sae_warns_on_a_digits_store():
    digits = store_provenance({"backbone": "digits-cnn", "output_kind": "pre_logits", "normalize": False, "d": 200})
    with pytest.warns(ProvenanceWarning):
        diffs = warn_if_different(PAPER_PROVENANCE, digits, "paper", "digits")
    assert len(diffs) == 4


def test_an_sae_trained_on_a_plain_array_saves_frequency_on_its_training_sample(tmp_path):
    from sae.train import train_sae

    x = np.random.default_rng(0).normal(size=(120, 8)).astype(np.float32)
    train_sae(x, tmp_path / "sae", SAEConfig(8, 16, 2), TrainConfig(n_steps=5), QUIET)
    assert read_provenance(tmp_path / "sae") is None
    freq = read_latent_frequency(tmp_path / "sae")
    assert freq.shape == (16,) and 0 < freq.sum() <= 2


def test_the_authors_sae_provenance_is_the_paper_recipe_so_a_paper_store_does_not_warn():
    from embeddings.recipes import PAPER_CLIP, RECIPES, recipe_preprocessing

    from sae.provenance import PAPER_PROVENANCE, provenance_differences

    recipe = RECIPES[PAPER_CLIP]
    store_record = {"backbone": PAPER_CLIP, "output_kind": recipe.output, "normalize": recipe.normalize, "d": 512,
                    "preprocessing": recipe_preprocessing(recipe, recipe.model)}
    assert provenance_differences(PAPER_PROVENANCE, store_record) == []
    # The GELU model with timm's default transform is another space, and is named as such.
    gelu = {**store_record, "backbone": "vit_base_patch16_clip_224.openai",
            "preprocessing": {**store_record["preprocessing"], "crop_pct": 0.9}}
    assert len(provenance_differences(PAPER_PROVENANCE, gelu)) == 2
