"""SAE checkpoints: round trip, strict loading, d_in checks, import of the authors' release format."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from artifacts import ArtifactError, read_json
from sae.checkpoint import check_compatible, import_paper_checkpoint, load_sae, save_sae
from sae.config import SAEConfig
from sae.model import TopKSAE


@pytest.mark.parametrize(
    "config",
    [SAEConfig(6, 24, 3), SAEConfig.paper(6, 24, 3), SAEConfig(6, 24, 4, subtract_decoder_bias=False, auxk_k=5)],
    ids=["topk", "paper", "topk-nobias"],
)
def test_round_trip_is_bitwise(tmp_path, config):
    model = TopKSAE(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    sae_dir = tmp_path / "sae"
    save_sae(model, sae_dir, train_config={"lr": 1e-3}, parent_store_hash="abc", metrics={"fvu": 0.5})
    loaded = load_sae(sae_dir)
    assert loaded.config == config
    for name, p in model.named_parameters():
        assert torch.equal(p, getattr(loaded, name)), name
    model.eval()
    x = torch.randn(7, 6)
    v1, i1 = model.encode(x)
    v2, i2 = loaded.encode(x)
    assert torch.equal(v1, v2) and torch.equal(i1, i2)
    assert torch.equal(model(x).recon, loaded(x).recon)
    cfg = read_json(sae_dir / "config.json")
    assert (cfg["d_in"], cfg["n_latents"], cfg["k"], cfg["variant"]) == (6, 24, config.k, config.variant)
    assert cfg["train"] == {"lr": 1e-3} and cfg["parent_store_hash"] == "abc" and cfg["metrics"] == {"fvu": 0.5}
    meta = read_json(sae_dir / "meta.json")
    assert len(meta["weights_sha256"]) == 64 and meta["schema_version"] >= 1
    assert not (tmp_path / ".sae.partial").exists()


def test_refuses_to_replace_unless_overwrite(tmp_path):
    model = TopKSAE(SAEConfig(4, 8, 2))
    save_sae(model, tmp_path / "s")
    with pytest.raises(ArtifactError, match="--overwrite"):
        save_sae(model, tmp_path / "s")
    save_sae(model, tmp_path / "s", overwrite=True, extra_json={"history.json": [{"step": 1}]})
    assert json.loads((tmp_path / "s" / "history.json").read_text()) == [{"step": 1}]


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_sae(tmp_path / "nope")
    model = TopKSAE(SAEConfig(4, 8, 2))
    d = save_sae(model, tmp_path / "s")
    # Shape mismatch: weights of another width under this config.
    other = {k: v.detach() for k, v in TopKSAE(SAEConfig(4, 10, 2)).state_dict().items()}
    save_file(other, str(d / "sae.safetensors"))
    with pytest.raises(ArtifactError, match="W_enc has shape"):
        load_sae(d, verify_hash=False)
    with pytest.raises(ArtifactError, match="SHA-256"):
        load_sae(d)
    # Missing tensor.
    tensors = load_file(str(d / "sae.safetensors"))
    tensors.pop("b_dec")
    save_file(tensors, str(d / "sae.safetensors"))
    with pytest.raises(ArtifactError, match="missing tensors \\['b_dec'\\]"):
        load_sae(d, verify_hash=False)
    # Corrupt file.
    (d / "sae.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_sae(d, verify_hash=False)
    (d / "sae.safetensors").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_sae(d)


def test_d_in_mismatch_names_both(tmp_path):
    model = TopKSAE(SAEConfig(4, 8, 2))
    d = save_sae(model, tmp_path / "my_sae")
    loaded = load_sae(d)
    check_compatible(loaded, 4, "store X")
    with pytest.raises(ArtifactError) as err:
        check_compatible(loaded, 7, "store /data/clip_store")
    msg = str(err.value)
    assert "my_sae" in msg and "d_in=4" in msg and "/data/clip_store" in msg and "d=7" in msg
    assert "train_sae.py" in msg
    with pytest.raises(ArtifactError, match="d_in=4"):
        check_compatible(SAEConfig(4, 8, 2), 5, "store Y")


def write_authors_checkpoint(path, d=6, factor=4, k=3, with_bias=True):
    torch.manual_seed(5)
    n = d * factor
    state = {
        "W_enc": torch.randn(d, n),
        "b_enc": torch.randn(n) * 0.1,
        "W_dec": torch.randn(n, d),  # deliberately not unit norm: the model normalises in forward
        "feature_counts": torch.arange(n, dtype=torch.float32),
        "total_samples": torch.tensor(1000),
    }
    if with_bias:
        state["b_dec"] = torch.randn(d)
    config = {"feature_dim": d, "expansion_factor": factor, "k": k, "ghost_weight": 1e6, "decoder_bias": with_bias,
              "normalize_decoder": True, "learning_rate": 1e-3}
    torch.save({"config": config, "model_state_dict": state, "epoch": 3}, path)
    return state


def test_import_authors_checkpoint_matches_hand_computation(tmp_path):
    state = write_authors_checkpoint(tmp_path / "clip_sae_checkpoint.pt")
    sae_dir = import_paper_checkpoint(tmp_path / "clip_sae_checkpoint.pt", tmp_path / "imported")
    model = load_sae(sae_dir)
    assert model.config.variant == "paper" and model.config.k == 3 and model.config.n_latents == 24
    x = torch.randn(9, 6)
    values, indices = model.encode(x)
    pre = x @ state["W_enc"] + state["b_enc"]  # the authors' encoder: no bias subtraction, no ReLU
    ref_values, ref_indices = torch.topk(pre, 3, dim=1)
    torch.testing.assert_close(values, ref_values)
    assert torch.equal(indices, ref_indices)
    W_n = state["W_dec"] / state["W_dec"].norm(dim=1, keepdim=True)
    recon = torch.zeros(9, 24).scatter(1, ref_indices, ref_values) @ W_n + state["b_dec"]
    torch.testing.assert_close(model.decode(values, indices), recon)
    cfg = read_json(sae_dir / "config.json")
    assert cfg["train"]["authors_config"]["expansion_factor"] == 4
    assert cfg["metrics"]["authors_never_fired_fraction"] == pytest.approx(1 / 24)


def test_import_without_decoder_bias(tmp_path):
    write_authors_checkpoint(tmp_path / "c.pt", with_bias=False)
    model = load_sae(import_paper_checkpoint(tmp_path / "c.pt", tmp_path / "s"))
    assert torch.equal(model.b_dec, torch.zeros(6))


class NotPlain:
    pass


def test_import_refuses_arbitrary_objects_and_bad_layouts(tmp_path):
    torch.save({"config": {"k": 2}, "model_state_dict": {}, "obj": NotPlain()}, tmp_path / "evil.pt")
    with pytest.raises(ArtifactError, match="weights_only=True"):
        import_paper_checkpoint(tmp_path / "evil.pt", tmp_path / "s")
    torch.save({"state": {}}, tmp_path / "other.pt")
    with pytest.raises(ArtifactError, match="model_state_dict"):
        import_paper_checkpoint(tmp_path / "other.pt", tmp_path / "s")
    state = write_authors_checkpoint(tmp_path / "bad.pt")
    torch.save({"config": {"feature_dim": 7, "expansion_factor": 4, "k": 3}, "model_state_dict": state}, tmp_path / "bad.pt")
    with pytest.raises(ArtifactError, match="config says d=7"):
        import_paper_checkpoint(tmp_path / "bad.pt", tmp_path / "s")
    with pytest.raises(ArtifactError, match="does not exist"):
        import_paper_checkpoint(tmp_path / "missing.pt", tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_import_hub_snapshot(tmp_path):
    state = write_authors_checkpoint(tmp_path / "c.pt")
    snap = tmp_path / "snapshot"
    snap.mkdir()
    save_file({k: v.contiguous() for k, v in state.items() if k.startswith(("W_", "b_"))}, str(snap / "model.safetensors"))
    (snap / "config.json").write_text(json.dumps({"input_dim": 6, "hidden_dim": 24, "k": 3}))
    model = load_sae(import_paper_checkpoint(snap, tmp_path / "s"))
    assert torch.equal(model.W_enc, state["W_enc"])
