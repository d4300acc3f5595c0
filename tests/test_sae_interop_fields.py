"""One test per peer config field that changes what the SAE computes: folded into the imported weights (and
then equal to the peer's equations, ``sae_interop_reference``) or refused by name. The README's tables list
exactly the fields the importer knows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from sae_interop_reference import (
    D, K, N, dense, random_tensors, saelens_forward, sparsify_files, sparsify_forward, write_saelens,
    write_sparsify, x_batch,
)

from artifacts import ArtifactError
from sae.interop import read_foreign_sae
from sae.interop_saelens import REFUSED_ARCHITECTURES, SAELENS_FIELDS
from sae.interop_sparsify import SPARSIFY_FIELDS

README = Path(__file__).resolve().parents[1] / "README.md"


def assert_same_function(src_dir, reference, x=None, tol=1e-4):
    """The imported SAE's codes and reconstructions equal the reference's; every row has the same active set."""
    x = x_batch() if x is None else x
    model = read_foreign_sae(src_dir).build()
    codes, recon = reference(x)
    with torch.no_grad():
        out = model(x)
    ours = dense(out.values, out.indices, codes.shape[1])
    assert torch.equal(ours > 0, codes > 0)
    torch.testing.assert_close(ours, codes, rtol=tol, atol=tol)
    torch.testing.assert_close(out.recon, recon, rtol=tol, atol=tol)
    return model


# ----------------------------------------------------------------------------------------------- SAELens
def test_rescale_acts_by_decoder_norm_is_folded_into_unit_decoder_rows(tmp_path):
    t = random_tensors(0, unit_rows=False)
    cfg = write_saelens(tmp_path / "lens", t, rescale_acts_by_decoder_norm=True)
    model = assert_same_function(tmp_path / "lens", lambda x: saelens_forward(t, cfg, x))
    torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(N))
    assert read_foreign_sae(tmp_path / "lens").folded == ("rescale_acts_by_decoder_norm",)
    # The field matters on these weights: read without it, the codes differ.
    plain = saelens_forward(t, {**cfg, "rescale_acts_by_decoder_norm": False}, x_batch())[0]
    assert not torch.equal(plain > 0, saelens_forward(t, cfg, x_batch())[0] > 0)


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_expected_average_normalisation_is_folded_from_the_scaler_file(tmp_path, apply_b_dec):
    t = random_tensors(1, unit_rows=False)
    cfg = write_saelens(tmp_path / "lens", t, normalize_activations="expected_average_only_in",
                        apply_b_dec_to_input=apply_b_dec, rescale_acts_by_decoder_norm=True)
    with pytest.raises(ArtifactError, match=r"expected_average_only_in.*activation_scaler.json is missing"):
        read_foreign_sae(tmp_path / "lens")
    scaler = {"scaling_factor": 3.5, "has_whitening": False}  # as SAELens's ActivationScaler.save writes it
    (tmp_path / "lens" / "activation_scaler.json").write_text(json.dumps(scaler))
    x = x_batch() * 0.3

    def folded_by_saelens(x):
        # SAELens's trainer folds the scale while the decoder-norm rescaling stays on: codes / 3.5, same output.
        codes, recon = saelens_forward(t, cfg, x, scaling_factor=3.5)
        return codes / 3.5, recon

    assert_same_function(tmp_path / "lens", folded_by_saelens, x=x)
    assert read_foreign_sae(tmp_path / "lens").folded == (
        "rescale_acts_by_decoder_norm", "normalize_activations=expected_average_only_in")


def whitening_stats(seed: int):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    eig = 0.5 + torch.rand(D, generator=g, dtype=torch.float64)
    mean = torch.randn(D, generator=g, dtype=torch.float64)
    return mean, (q * eig.rsqrt()).contiguous(), (eig.sqrt()[:, None] * q.T).contiguous()


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_covariance_whitening_is_folded_from_the_whitening_file(tmp_path, apply_b_dec):
    t = random_tensors(2)
    cfg = write_saelens(tmp_path / "lens", t, normalize_activations="covariance_whitening",
                        apply_b_dec_to_input=apply_b_dec)
    with pytest.raises(ArtifactError, match=r"covariance_whitening.*activation_whitening.safetensors is missing"):
        read_foreign_sae(tmp_path / "lens")
    mean, matrix, inverse = whitening_stats(3)
    save_file({"mean": mean, "matrix": matrix, "inverse_matrix": inverse},
              str(tmp_path / "lens" / "activation_whitening.safetensors"))
    stats = (mean, matrix, inverse)
    x = x_batch() + mean.float()
    assert_same_function(tmp_path / "lens", lambda x: saelens_forward(t, cfg, x, whitening=stats), x=x)


@pytest.mark.parametrize("normalisation", ["constant_norm_rescale", "layer_norm", "something_new"])
def test_per_input_activation_normalisations_are_refused_by_name(tmp_path, normalisation):
    write_saelens(tmp_path / "lens", random_tensors(4), normalize_activations=normalisation)
    with pytest.raises(ArtifactError, match=f"normalize_activations='{normalisation}'"):
        read_foreign_sae(tmp_path / "lens")


def test_hook_z_reshaping_is_refused_in_both_config_versions(tmp_path):
    write_saelens(tmp_path / "v6", random_tensors(5), reshape_activations="hook_z")
    with pytest.raises(ArtifactError, match="reshape_activations='hook_z'"):
        read_foreign_sae(tmp_path / "v6")
    # SAELens 5 had no field: a z hook meant per-head reshaping.
    v5 = {"architecture": "topk", "d_in": D, "d_sae": N, "k": K, "model_name": "gpt2",
          "hook_name": "blocks.0.attn.hook_z"}
    write_saelens(tmp_path / "v5", random_tensors(5), cfg=v5)
    with pytest.raises(ArtifactError, match="reshape_activations='hook_z'"):
        read_foreign_sae(tmp_path / "v5")


@pytest.mark.parametrize("architecture", [*REFUSED_ARCHITECTURES, "brand_new"])
def test_architectures_other_than_topk_are_refused_by_name(tmp_path, architecture):
    write_saelens(tmp_path / "lens", random_tensors(6), architecture=architecture)
    with pytest.raises(ArtifactError, match=f"architecture '{architecture}' is .*only SAELens 'topk'"):
        read_foreign_sae(tmp_path / "lens")


def test_dtype_is_the_precision_saelens_computes_in(tmp_path):
    t = random_tensors(7)
    cfg = write_saelens(tmp_path / "bf16", t, dtype="bfloat16")  # SAELens rounds the float32 file to bfloat16
    rounded = {k: v.bfloat16().float() for k, v in t.items()}
    model = assert_same_function(tmp_path / "bf16", lambda x: saelens_forward(rounded, {**cfg, "dtype": "float32"}, x))
    assert torch.equal(model.W_enc, rounded["W_enc"]) and torch.equal(model.W_dec, rounded["W_dec"])
    wide = {k: v.double() + 1e-12 for k, v in t.items()}  # float64 values no float32 holds
    write_saelens(tmp_path / "f64", wide, dtype="float64")
    with pytest.raises(ArtifactError, match=r"dtype 'float64'.*float32 cannot hold exactly"):
        read_foreign_sae(tmp_path / "f64")
    write_saelens(tmp_path / "f64ok", {k: v.double() for k, v in t.items()}, dtype="float64")
    assert torch.equal(read_foreign_sae(tmp_path / "f64ok").build().W_enc, t["W_enc"])


def test_saelens_5_flat_config_with_its_finetuning_scaling_factor(tmp_path):
    t = {**random_tensors(8), "scaling_factor": 0.5 + torch.rand(N, generator=torch.Generator().manual_seed(0))}
    v5 = {"d_in": D, "d_sae": N, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}, "dtype": "float32",
          "apply_b_dec_to_input": True, "finetuning_scaling_factor": True, "model_name": "gpt2",
          "hook_name": "blocks.3.hook_resid_pre", "hook_layer": 3, "normalize_activations": "none",
          "sae_lens_training_version": "5.3.0", "l1_coefficient": 5.0, "metadata": {"ignored_by": "SAELens 5"}}
    cfg = write_saelens(tmp_path / "v5", t, cfg=v5)
    assert_same_function(tmp_path / "v5", lambda x: saelens_forward(t, {**cfg, "k": K}, x))
    foreign = read_foreign_sae(tmp_path / "v5")
    assert foreign.folded == ("finetuning_scaling_factor",)
    assert foreign.provenance == {"backbone": "gpt2", "output_kind": "blocks.3.hook_resid_pre"}
    write_saelens(tmp_path / "relu", random_tensors(8), cfg={**v5, "activation_fn_str": "relu"})
    with pytest.raises(ArtifactError, match="architecture 'standard'"):
        read_foreign_sae(tmp_path / "relu")
    write_saelens(tmp_path / "bool", random_tensors(8), cfg={**v5, "normalize_activations": True,
                                                              "finetuning_scaling_factor": False})
    with pytest.raises(ArtifactError, match="expected_average_only_in"):
        read_foreign_sae(tmp_path / "bool")


@pytest.mark.parametrize("writer, cfg_field", [("saelens", "lora_rank"), ("sparsify", "signed")])
def test_fields_the_importer_does_not_know_are_refused_by_name(tmp_path, writer, cfg_field):
    if writer == "saelens":
        write_saelens(tmp_path / "x", random_tensors(9), **{cfg_field: 4})
    else:
        write_sparsify(tmp_path / "x", random_tensors(9), **{cfg_field: True})
    with pytest.raises(ArtifactError, match=rf"(?i)\['{cfg_field}'\] are not {writer} fields this importer knows"):
        read_foreign_sae(tmp_path / "x")


def test_tensors_the_importer_does_not_know_are_refused(tmp_path):
    write_saelens(tmp_path / "lens", {**random_tensors(10), "threshold": torch.zeros(N)})
    with pytest.raises(ArtifactError, match=r"unknown tensors \['threshold'\]"):
        read_foreign_sae(tmp_path / "lens")


# ----------------------------------------------------------------------------------------------- sparsify
@pytest.mark.parametrize("field, value, message", [
    ("activation", "groupmax", "activation 'groupmax' is not top-k"),
    ("skip_connection", True, "skip_connection=true adds a learned x @ W_skip"),
    ("transcode", True, "transcode=true makes it a transcoder"),
])
def test_sparsify_settings_that_change_the_function_are_refused(tmp_path, field, value, message):
    write_sparsify(tmp_path / "eai", random_tensors(11), **{field: value})
    with pytest.raises(ArtifactError, match=re.escape(message)):
        read_foreign_sae(tmp_path / "eai")


def test_sparsify_defaults_fill_missing_fields_as_sparsify_does(tmp_path):
    """No num_latents and no k: sparsify takes d_in * expansion_factor latents and k = 32."""
    t = random_tensors(12, n=D * 4)
    write_sparsify(tmp_path / "eai", t, num_latents=0)
    cfg = json.loads((tmp_path / "eai" / "cfg.json").read_text())
    del cfg["k"]
    (tmp_path / "eai" / "cfg.json").write_text(json.dumps(cfg))
    model = assert_same_function(tmp_path / "eai", lambda x: sparsify_forward(sparsify_files(t), cfg, x))
    assert model.config.n_latents == 48 and model.config.k == 32


def test_sparsify_decoder_rows_are_used_as_stored_whatever_normalize_decoder_says(tmp_path):
    t = random_tensors(13, unit_rows=False)
    cfg = write_sparsify(tmp_path / "eai", t, normalize_decoder=False)
    assert_same_function(tmp_path / "eai", lambda x: sparsify_forward(sparsify_files(t), cfg, x))


def test_sparsify_computes_in_its_files_dtype(tmp_path):
    t = random_tensors(14)
    half = {k: v.half() for k, v in t.items()}
    cfg = write_sparsify(tmp_path / "f16", half)
    model = assert_same_function(
        tmp_path / "f16", lambda x: sparsify_forward({k: v.float() for k, v in sparsify_files(half).items()}, cfg, x))
    assert model.W_dec.dtype == torch.float32 and torch.equal(model.W_dec, half["W_dec"].float())
    write_sparsify(tmp_path / "f64", {k: v.double() + 1e-12 for k, v in t.items()})
    with pytest.raises(ArtifactError, match="float32 cannot hold exactly"):
        read_foreign_sae(tmp_path / "f64")


# ----------------------------------------------------------------------------------------------- README
@pytest.mark.parametrize("heading, fields", [("SAELens `cfg.json`", SAELENS_FIELDS),
                                             ("sparsify `cfg.json`", SPARSIFY_FIELDS)])
def test_readme_tables_list_exactly_the_fields_the_importer_knows(heading, fields):
    text = README.read_text()
    start = text.index(heading)
    section = text[start:text.index("\n#", start + 1)]
    table = [line for line in section.splitlines() if line.startswith("| `")]
    listed = {name for line in table for name in re.findall(r"`([a-z_0-9]+)`", line.split("|")[1])}
    assert listed == set(fields)
