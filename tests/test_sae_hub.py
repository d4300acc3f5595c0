"""The authors' SAE named by its hub id or its cache folder, resolved in a local Hugging Face cache laid out here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from artifacts import ArtifactError
from sae.checkpoint import import_paper_checkpoint, load_sae, read_latent_frequency, read_provenance
from sae.hub import PAPER_HUB_ID, hub_cache_dir, resolve_sae_source
from sae.provenance import PAPER_PROVENANCE
from script_runner import run_script_in_process

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "import_paper_sae.py"
D, N, K = 6, 24, 3


def authors_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"W_enc": torch.randn(D, N, generator=g), "b_enc": torch.randn(N, generator=g) * 0.1,
            "W_dec": torch.randn(N, D, generator=g), "b_dec": torch.randn(D, generator=g)}


def fake_cache(cache: Path, repo_id: str = PAPER_HUB_ID, commit: str = "0123abcd", with_ref: bool = True) -> Path:
    """``models--OWNER--NAME/{refs/main, snapshots/COMMIT/{config.json, model.safetensors}}`` as the hub writes it."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    if with_ref:
        (root / "refs" / "main").write_text(commit)
    state = authors_state()
    save_file({k: v.contiguous() for k, v in state.items()}, str(snap / "model.safetensors"))
    (snap / "config.json").write_text(json.dumps({"input_dim": D, "hidden_dim": N, "k": K}))
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_resolves_through_the_local_cache(cache, tmp_path):
    root = fake_cache(cache)
    assert hub_cache_dir() == cache
    assert resolve_sae_source(PAPER_HUB_ID) == root / "snapshots" / "0123abcd"
    model = load_sae(import_paper_checkpoint(PAPER_HUB_ID, tmp_path / "sae"))
    assert model.config.variant == "paper" and torch.equal(model.W_enc, authors_state()["W_enc"])
    assert read_provenance(tmp_path / "sae") == PAPER_PROVENANCE
    assert read_provenance(tmp_path / "sae")["d"] == 512 and PAPER_PROVENANCE["normalize"] is True


def test_cache_root_resolves_to_its_main_snapshot(cache, tmp_path):
    root = fake_cache(cache)
    (root / "snapshots" / "older").mkdir()  # another snapshot: refs/main decides
    model = load_sae(import_paper_checkpoint(root, tmp_path / "sae"))
    assert torch.equal(model.b_dec, authors_state()["b_dec"])


def test_cache_root_without_ref_uses_its_only_snapshot_and_refuses_to_guess(cache):
    root = fake_cache(cache, with_ref=False)
    assert resolve_sae_source(root) == root / "snapshots" / "0123abcd"
    (root / "snapshots" / "other").mkdir()
    with pytest.raises(ArtifactError, match="no refs/main and 2 snapshots"):
        resolve_sae_source(root)


def test_without_huggingface_hub_the_same_layout_is_read(cache, monkeypatch):
    root = fake_cache(cache)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    assert resolve_sae_source(PAPER_HUB_ID) == root / "snapshots" / "0123abcd"


def test_uncached_hub_id_says_how_to_download_it(cache, tmp_path):
    with pytest.raises(ArtifactError, match="huggingface-cli download patrikwolf/clip-topk-sae") as e:
        import_paper_checkpoint(PAPER_HUB_ID, tmp_path / "sae")
    assert "HF_HUB_OFFLINE is set" in str(e.value) and str(cache) in str(e.value)
    assert not (tmp_path / "sae").exists()
    with pytest.raises(ArtifactError, match="does not exist, and it is not a hub id"):
        resolve_sae_source(str(tmp_path / "no" / "such" / "file.pt"))


def test_script_imports_by_hub_id_and_answers_one_line_when_uncached(cache, tmp_path, capsys):
    def run(*argv):
        return run_script_in_process(SCRIPT.name, *argv, capsys=capsys)

    code, _, err = run("--checkpoint", PAPER_HUB_ID, "--out", str(tmp_path / "a"))
    assert code == 2 and err.startswith("error: ") and "huggingface-cli download" in err and "Traceback" not in err
    fake_cache(cache)
    code, out, _ = run("--checkpoint", PAPER_HUB_ID, "--out", str(tmp_path / "a"))
    assert code == 0 and "imported" in out and (tmp_path / "a" / "sae.safetensors").is_file()


def test_authors_feature_counts_become_the_saved_firing_frequency(tmp_path):
    state = {**authors_state(), "feature_counts": torch.arange(N, dtype=torch.float32),
             "total_samples": torch.tensor(1000)}
    config = {"feature_dim": D, "expansion_factor": N // D, "k": K, "normalize_decoder": True}
    torch.save({"config": config, "model_state_dict": state}, tmp_path / "c.pt")
    import_paper_checkpoint(tmp_path / "c.pt", tmp_path / "sae")
    np.testing.assert_allclose(read_latent_frequency(tmp_path / "sae"), np.arange(N) / 1000)
