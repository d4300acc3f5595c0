"""SAEs in and out of the SAELens and sparsify layouts: files written here by hand in each layout, and the
equations of each library written out (``sae_interop_reference``), so that neither library is needed. What
each config field maps to is tested in ``test_sae_interop_fields.py``; the real libraries in
``test_sae_interop_peers.py``."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from sae_interop_reference import (
    D, K, N, dense, random_tensors, saelens_forward, sparsify_forward, write_saelens, write_sparsify, x_batch,
)
from script_runner import run_script_in_process

from artifacts import ArtifactError, read_json
from sae.checkpoint import load_sae, read_latent_frequency, read_provenance, save_sae
from sae.config import SAEConfig
from sae.interop import (
    NegativeCodesWarning, detect_format, export_sae, export_sae_dir, import_foreign_sae, read_foreign_sae,
)
from sae.model import TopKSAE

WEIGHTS = {"saelens": "sae_weights.safetensors", "sparsify": "sae.safetensors"}
PROV = {"backbone": "resnet50", "output_kind": "pre_logits", "normalize": False, "preprocessing": None, "d": D}


def random_topk_model(seed: int = 0) -> TopKSAE:
    torch.manual_seed(seed)
    model = TopKSAE(SAEConfig(D, N, K))
    with torch.no_grad():
        model.b_enc.normal_(0, 0.1), model.b_dec.normal_(0, 0.1)
    return model.eval()


def frequency_record() -> dict:
    freq = np.linspace(0, 0.5, N)
    freq[3] = 1.0 / 977  # one firing in 977 rows
    return {"frequency": freq, "n_rows": 977, "rows": "held-out rows"}


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_directory_imports_to_the_same_function(tmp_path, apply_b_dec):
    t = random_tensors(0)
    cfg = write_saelens(tmp_path / "lens", t, apply_b_dec_to_input=apply_b_dec)
    assert detect_format(tmp_path / "lens") == "saelens"
    import_foreign_sae(tmp_path / "lens", tmp_path / "ours")
    model = load_sae(tmp_path / "ours")
    assert model.config.subtract_decoder_bias == apply_b_dec and model.config.variant == "topk"
    x = x_batch()
    codes, recon = saelens_forward(t, cfg, x)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out.recon, recon, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense(out.values, out.indices, N), codes, rtol=1e-5, atol=1e-5)
    assert read_provenance(tmp_path / "ours") == {"backbone": "vit_base_patch16_clip_224.openai"}
    assert read_latent_frequency(tmp_path / "ours") is None


def test_sparsify_directory_imports_to_the_same_function(tmp_path):
    t = random_tensors(1)
    cfg = write_sparsify(tmp_path / "eai", t)
    assert detect_format(tmp_path / "eai") == "sparsify"
    import_foreign_sae(tmp_path / "eai", tmp_path / "ours")
    model = load_sae(tmp_path / "ours")
    x = x_batch()
    with torch.no_grad():
        ours = model(x).recon
    files = load_file(str(tmp_path / "eai" / "sae.safetensors"))
    torch.testing.assert_close(ours, sparsify_forward(files, cfg, x)[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_topk_sae_exports_and_comes_back_unchanged(tmp_path, fmt):
    model = random_topk_model()
    export_sae(model, tmp_path / fmt, fmt, provenance=PROV, latent_frequency=frequency_record())
    files = load_file(str(tmp_path / fmt / WEIGHTS[fmt]))
    cfg = json.loads((tmp_path / fmt / "cfg.json").read_text())
    if fmt == "saelens":
        assert {k: tuple(v.shape) for k, v in files.items()} == {
            "W_enc": (D, N), "b_enc": (N,), "W_dec": (N, D), "b_dec": (D,)}
        assert cfg["architecture"] == "topk" and cfg["d_sae"] == N and cfg["rescale_acts_by_decoder_norm"] is False
        reference = saelens_forward(files, cfg, x_batch())[1]
    else:
        assert {k: tuple(v.shape) for k, v in files.items()} == {
            "encoder.weight": (N, D), "encoder.bias": (N,), "W_dec": (N, D), "b_dec": (D,)}
        assert cfg["num_latents"] == N and cfg["activation"] == "topk" and cfg["d_in"] == D
        reference = sparsify_forward(files, cfg, x_batch())[1]
    with torch.no_grad():
        torch.testing.assert_close(model(x_batch()).recon, reference, rtol=1e-5, atol=1e-5)
    back = read_foreign_sae(tmp_path / fmt)
    built = back.build()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(built, name), getattr(model, name)), name
    assert built.config == model.config and back.provenance == PROV and back.folded == ()
    np.testing.assert_allclose(back.frequency["frequency"], frequency_record()["frequency"], rtol=1e-5, atol=0)
    assert back.frequency["n_rows"] == 977 and back.frequency["rows"] == "held-out rows"


def test_saelens_export_keeps_provenance_in_the_metadata_saelens_6_reads(tmp_path):
    export_sae(random_topk_model(), tmp_path / "lens", "saelens", provenance=PROV)
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    # SAELens 6 treats a config whose metadata names no version >= 6 as a version-5 one and drops the metadata.
    assert "meta" not in cfg and "provenance" not in cfg
    assert cfg["metadata"]["sae_lens_version"].split(".")[0] == "6"
    assert cfg["metadata"]["model_name"] == "resnet50" and cfg["metadata"]["hook_name"] == "pre_logits"
    assert cfg["metadata"]["provenance"] == PROV


def test_sparsify_export_keeps_provenance_beside_its_config(tmp_path):
    export_sae(random_topk_model(), tmp_path / "eai", "sparsify", provenance=PROV)
    cfg = json.loads((tmp_path / "eai" / "cfg.json").read_text())
    # sparsify drops (and prints) every key its SparseCoderConfig lacks, d_in apart.
    assert set(cfg) == {"activation", "expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk",
                        "skip_connection", "transcode", "d_in"}
    assert read_json(tmp_path / "eai" / "provenance.json") == PROV


def test_firing_frequencies_are_written_as_saelens_log10_sparsity(tmp_path):
    record = frequency_record()
    export_sae(random_topk_model(), tmp_path / "lens", "saelens", latent_frequency=record)
    with safe_open(str(tmp_path / "lens" / "sparsity.safetensors"), framework="pt") as f:
        log = f.get_tensor("sparsity")
    assert log.dtype == torch.float32 and log.shape == (N,)
    np.testing.assert_allclose(log.double().numpy(), np.log10(record["frequency"] + 1e-10), rtol=1e-6)
    assert float(log[0]) == pytest.approx(-10.0)  # a latent that never fired, as SAELens stores it
    back = read_foreign_sae(tmp_path / "lens").frequency["frequency"]
    assert back[0] == 0.0 and back[3] == pytest.approx(1 / 977, rel=1e-5)


def test_our_directory_exports_with_its_provenance_and_frequencies_and_imports_back(tmp_path):
    model = random_topk_model(2)
    save_sae(model, tmp_path / "ours", provenance=PROV, latent_frequency=frequency_record())
    export_sae_dir(tmp_path / "ours", tmp_path / "lens", "saelens")
    import_foreign_sae(tmp_path / "lens", tmp_path / "back")
    assert read_provenance(tmp_path / "back") == PROV
    np.testing.assert_allclose(read_latent_frequency(tmp_path / "back"), frequency_record()["frequency"], rtol=1e-5)
    record = read_json(tmp_path / "back" / "config.json")["latent_frequency"]
    assert record["n_rows"] == 977 and record["rows"] == "held-out rows"
    assert torch.equal(load_sae(tmp_path / "back").W_enc, model.W_enc)


def test_saelens_sparsity_without_our_metadata_imports_with_unknown_row_count(tmp_path):
    from safetensors.torch import save_file

    write_saelens(tmp_path / "lens", random_tensors(3))
    freq = torch.linspace(0, 0.2, N)
    save_file({"sparsity": torch.log10(freq + 1e-10)}, str(tmp_path / "lens" / "sparsity.safetensors"))
    import_foreign_sae(tmp_path / "lens", tmp_path / "ours")
    np.testing.assert_allclose(read_latent_frequency(tmp_path / "ours"), freq.double().numpy(), rtol=1e-5, atol=0)
    assert read_json(tmp_path / "ours" / "config.json")["latent_frequency"]["n_rows"] is None


def test_earlier_exports_of_ours_still_import_with_their_provenance(tmp_path):
    """Before SAELens 6's ``metadata`` was written, exports kept provenance at the top level and in ``meta``."""
    write_saelens(tmp_path / "old", random_tensors(4), cfg={
        "architecture": "topk", "d_in": D, "d_sae": N, "k": K, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        "meta": {"model_name": "resnet50", "hook_name": "pre_logits"}, "provenance": PROV})
    assert read_foreign_sae(tmp_path / "old").provenance == PROV


def test_sparsify_run_folder_is_named_and_its_hookpoint_takes_the_runs_model(tmp_path):
    run = tmp_path / "run"
    write_sparsify(run / "layers.6", random_tensors(5))
    (run / "config.json").write_text(json.dumps(
        {"sae": {"k": K}, "hookpoints": ["layers.6"], "model": "EleutherAI/pythia-70m", "dataset": "pile"}))
    with pytest.raises(ArtifactError, match=r"sparsify training run .*\['layers.6'\].*--from .*layers.6"):
        detect_format(run)
    assert read_foreign_sae(run / "layers.6").provenance == {
        "backbone": "EleutherAI/pythia-70m", "output_kind": "layers.6", "dataset": "pile"}


def test_weights_of_other_shapes_than_the_config_says_and_empty_folders_are_refused(tmp_path):
    write_sparsify(tmp_path / "wide", random_tensors(6), num_latents=N + 1)
    with pytest.raises(ArtifactError, match=r"W_enc has shape \(12, 40\).*implies \(12, 41\)"):
        read_foreign_sae(tmp_path / "wide")
    write_saelens(tmp_path / "narrow", random_tensors(6), d_in=D - 1)
    with pytest.raises(ArtifactError, match="sae_weights.safetensors: W_enc has shape"):
        read_foreign_sae(tmp_path / "narrow")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="neither"):
        detect_format(tmp_path / "empty")


def test_our_own_sae_directory_is_recognised_not_imported(tmp_path):
    save_sae(random_topk_model(), tmp_path / "ours")
    for fmt in (None, "sparsify"):  # our weight file has sparsify's name: never read as sparsify's
        with pytest.raises(ArtifactError, match="already an SAE directory of this toolkit"):
            read_foreign_sae(tmp_path / "ours", fmt)


def paper_model(nonnegative: bool) -> TopKSAE:
    torch.manual_seed(3)
    model = TopKSAE(SAEConfig.paper(d_in=D, n_latents=N, k=K)).eval()
    with torch.no_grad():
        model.W_dec.mul_(torch.rand(N, 1) + 0.5)  # rows of other norms: the paper model normalises in forward
        model.b_dec.normal_(0, 0.1)
        model.b_enc.fill_(10.0 if nonnegative else -10.0)  # all pre-activations positive, or all negative
    return model


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_paper_sae_exports_exactly_while_its_top_k_values_are_nonnegative(tmp_path, fmt):
    model, x = paper_model(nonnegative=True), x_batch()
    export_sae(model, tmp_path / fmt, fmt, x_check=x.numpy())
    files = load_file(str(tmp_path / fmt / WEIGHTS[fmt]))
    cfg = json.loads((tmp_path / fmt / "cfg.json").read_text())
    forward = saelens_forward if fmt == "saelens" else sparsify_forward
    with torch.no_grad():
        torch.testing.assert_close(forward(files, cfg, x)[1], model(x).recon, rtol=1e-4, atol=1e-4)


def test_paper_sae_with_negative_top_k_values_is_refused_or_warned(tmp_path):
    model, x = paper_model(nonnegative=False), x_batch()
    with pytest.raises(ValueError, match="negative top-k value.*--allow-negative"):
        export_sae(model, tmp_path / "a", "sparsify", x_check=x.numpy())
    assert not (tmp_path / "a").exists()
    with pytest.warns(NegativeCodesWarning, match="64 of 64 checked rows"):
        export_sae(model, tmp_path / "b", "saelens", x_check=x.numpy(), allow_negative=True)
    with pytest.warns(NegativeCodesWarning, match="pass a data sample"):
        export_sae(model, tmp_path / "c", "saelens")


def test_topk_export_does_not_warn(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_sae(TopKSAE(SAEConfig(D, N, K)), tmp_path / "s", "sparsify")


def run_script(name: str, *argv: str, capsys) -> tuple[int, str, str]:
    return run_script_in_process(name, *argv, capsys=capsys)


def test_scripts_export_and_import_and_refuse_in_one_line(tmp_path, capsys):
    from embeddings.store import write_store

    save_sae(paper_model(nonnegative=False), tmp_path / "paper")
    store = write_store(tmp_path / "store", x_batch().numpy())
    code, _, err = run_script("export_sae.py", "--sae", str(tmp_path / "paper"), "--format", "sparsify",
                              "--out", str(tmp_path / "eai"), "--check-store", str(store.store_dir), capsys=capsys)
    assert code == 2 and err.startswith("error: ") and "--allow-negative" in err and err.count("\n") == 1
    save_sae(TopKSAE(SAEConfig(D, N, K)), tmp_path / "topk", latent_frequency=frequency_record())
    code, out, err = run_script("export_sae.py", "--sae", str(tmp_path / "topk"), "--format", "saelens",
                                "--out", str(tmp_path / "lens"), capsys=capsys)
    assert code == 0 and "saelens layout" in out, err
    assert (tmp_path / "lens" / "sparsity.safetensors").is_file()
    code, out, err = run_script("import_sae.py", "--from", str(tmp_path / "lens"), "--out", str(tmp_path / "back"),
                                capsys=capsys)
    assert code == 0, err
    assert torch.equal(load_sae(tmp_path / "back").W_enc, load_sae(tmp_path / "topk").W_enc)
    code, _, err = run_script("import_sae.py", "--from", str(tmp_path / "topk"), "--out", str(tmp_path / "again"),
                              capsys=capsys)
    assert code == 2 and "already an SAE directory of this toolkit" in err and "cfg.json is missing" not in err
    assert err.count("\n") == 1
