"""Round trips through the real SAELens and sparsify (the ``interop`` extra): our exports load in them and compute
what our SAE computes, with our provenance kept, and their own saves import and compute what they compute. Each
test is skipped, saying why, when its library is not importable."""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sae_interop_reference import D, K, N, dense, random_tensors, x_batch

from artifacts import ArtifactError
from sae.config import SAEConfig
from sae.interop import export_sae, read_foreign_sae
from sae.model import TopKSAE

pytestmark = pytest.mark.interop
PROV = {"backbone": "vit_base_patch16_clip_224.openai", "output_kind": "head", "normalize": True,
        "preprocessing": {"recipe": "clip", "mean": [0.5, 0.5, 0.5]}, "d": D}
INSTALL = "install the interop extra: pip install -e '.[interop]'"


@pytest.fixture(scope="module")
def saelens():
    try:
        import sae_lens
    except Exception as e:  # not installed, or a dependency of it broken
        pytest.skip(f"SAELens is not importable ({type(e).__name__}: {e}); {INSTALL}")
    return sae_lens


@pytest.fixture(scope="module")
def sparsify():
    # sparsify picks its decoder at import: its Triton kernel needs a GPU, so the eager one is asked for.
    with mock.patch.dict(os.environ, {"SPARSIFY_DISABLE_TRITON": "1"}):
        try:
            import sparsify
        except Exception as e:
            pytest.skip(f"sparsify (eai-sparsify) is not importable ({type(e).__name__}: {e}); {INSTALL}")
    return sparsify


def random_model(seed: int = 0) -> TopKSAE:
    torch.manual_seed(seed)
    model = TopKSAE(SAEConfig(D, N, K))
    with torch.no_grad():
        model.b_enc.normal_(0, 0.3), model.b_dec.normal_(0, 0.1)
    return model.eval()


def assert_same_codes(ours: TopKSAE, codes: torch.Tensor, recon: torch.Tensor, x: torch.Tensor, tol=4e-6):
    with torch.no_grad():
        out = ours(x)
    mine = dense(out.values, out.indices, codes.shape[1])
    assert torch.equal(mine > 0, codes > 0), "the active latents differ"
    torch.testing.assert_close(mine, codes, rtol=tol, atol=tol)
    torch.testing.assert_close(out.recon, recon, rtol=tol, atol=tol)


def set_weights(module, tensors: dict) -> None:
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(module, name).copy_(value)


# ----------------------------------------------------------------------------------------------- SAELens
def test_saelens_loads_our_export_with_its_provenance_and_saves_it_back(saelens, tmp_path):
    model, x = random_model(), x_batch()
    export_sae(model, tmp_path / "lens", "saelens", provenance=PROV)
    sae = saelens.SAE.load_from_disk(tmp_path / "lens")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(sae, name).detach(), getattr(model, name).detach()), name
    with torch.no_grad():
        codes = sae.encode(x)
        assert_same_codes(model, codes, sae.decode(codes), x)
    assert sae.cfg.metadata.model_name == PROV["backbone"] and sae.cfg.metadata.hook_name == "head"
    assert sae.cfg.metadata.provenance == PROV
    sae.save_model(tmp_path / "saved")
    back = read_foreign_sae(tmp_path / "saved")
    assert back.provenance == PROV and torch.equal(back.build().W_enc, model.W_enc)


def test_saelens_topk_training_sae_with_decoder_norm_rescaling_imports(saelens, tmp_path):
    """SAELens trains top-k SAEs with rescale_acts_by_decoder_norm on by default; its decoder rows drift."""
    from sae_lens import SAE, TopKTrainingSAE, TopKTrainingSAEConfig

    training = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=N, k=K))
    assert training.cfg.rescale_acts_by_decoder_norm
    set_weights(training, random_tensors(1, unit_rows=False))
    training.save_model(tmp_path / "trained")  # the training config: aux_loss_coefficient, decoder_init_norm, ...
    freq = torch.linspace(0, 0.3, N)
    save_file({"sparsity": torch.log10(freq + 1e-10)}, str(tmp_path / "trained" / "sparsity.safetensors"))
    sae, x = SAE.load_from_disk(tmp_path / "trained"), x_batch()
    foreign = read_foreign_sae(tmp_path / "trained")
    with torch.no_grad():
        codes = sae.encode(x)
        assert_same_codes(foreign.build(), codes, sae.decode(codes), x)
    assert foreign.folded == ("rescale_acts_by_decoder_norm",)
    np.testing.assert_allclose(foreign.frequency["frequency"], freq.double().numpy(), rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("normalisation", ["expected_average_only_in", "covariance_whitening"])
def test_saelens_checkpoint_saved_during_training_imports_as_saelens_folds_it(saelens, tmp_path, normalisation):
    from sae_lens import SAE, TopKSAE as LensTopK, TopKSAEConfig
    from sae_lens.training.activation_scaler import ActivationScaler, ActivationWhitening

    sae = LensTopK(TopKSAEConfig(d_in=D, d_sae=N, k=K, normalize_activations=normalisation,
                                 rescale_acts_by_decoder_norm=True))
    set_weights(sae, random_tensors(2, unit_rows=False))
    sae.save_model(tmp_path / "ckpt")
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    eig = 0.5 + torch.rand(D, generator=g, dtype=torch.float64)
    mean = torch.randn(D, generator=g, dtype=torch.float64)
    scaler = (ActivationScaler(scaling_factor=2.5) if normalisation == "expected_average_only_in" else
              ActivationScaler(whitening=ActivationWhitening(mean, q * eig.rsqrt(), eig.sqrt()[:, None] * q.T)))
    scaler.save(str(tmp_path / "ckpt" / "activation_scaler.json"))
    reference = SAE.load_from_disk(tmp_path / "ckpt")
    if scaler.scaling_factor is not None:  # what SAELens's trainer does at the end of training
        reference.fold_activation_norm_scaling_factor(scaler.scaling_factor)
    else:
        reference.fold_activation_whitening(mean, scaler.whitening.matrix, scaler.whitening.inverse_matrix)
    x = x_batch() + mean.float()
    with torch.no_grad():
        codes = reference.encode(x)
        assert_same_codes(read_foreign_sae(tmp_path / "ckpt").build(), codes, reference.decode(codes), x, tol=1e-4)


def test_saelens_sae_of_another_architecture_is_refused(saelens, tmp_path):
    from sae_lens import StandardSAE, StandardSAEConfig

    StandardSAE(StandardSAEConfig(d_in=D, d_sae=N)).save_model(tmp_path / "relu")
    with pytest.raises(ArtifactError, match="architecture 'standard'"):
        read_foreign_sae(tmp_path / "relu")


# ----------------------------------------------------------------------------------------------- sparsify
def sparsify_codes(coder, x: torch.Tensor):
    with torch.no_grad():
        top_acts, top_indices, _ = coder.encode(x)
        recon = coder.decode(top_acts, top_indices)
    return torch.zeros(x.shape[0], coder.num_latents).scatter_(1, top_indices, top_acts), recon


def test_sparsify_loads_our_export_cleanly_and_saves_it_back(sparsify, tmp_path, capfd):
    model, x = random_model(3), x_batch()
    export_sae(model, tmp_path / "eai", "sparsify", provenance=PROV)
    capfd.readouterr()
    coder = sparsify.SparseCoder.load_from_disk(tmp_path / "eai")
    printed = capfd.readouterr()
    assert "Dropping" not in printed.out + printed.err  # sparsify names every cfg.json key it drops
    assert torch.equal(coder.encoder.weight.detach(), model.W_enc.detach().T)
    assert_same_codes(model, *sparsify_codes(coder, x), x)
    coder.save_to_disk(tmp_path / "saved")
    back = read_foreign_sae(tmp_path / "saved").build()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(model, name)), name


def test_sparsify_save_imports_to_its_function(sparsify, tmp_path):
    coder = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=N, k=K))
    t = random_tensors(4, unit_rows=False)
    set_weights(coder, {"W_dec": t["W_dec"], "b_dec": t["b_dec"]})
    set_weights(coder.encoder, {"weight": t["W_enc"].T, "bias": t["b_enc"]})
    coder.save_to_disk(tmp_path / "eai")
    x = x_batch()
    assert_same_codes(read_foreign_sae(tmp_path / "eai").build(), *sparsify_codes(coder, x), x)
