"""SAEs in and out of the SAELens and sparsify layouts: files written here by hand in each layout, and the
equations of each library written out, so that neither library is needed."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from artifacts import ArtifactError
from sae.checkpoint import load_sae, read_provenance, save_sae
from sae.config import SAEConfig
from sae.interop import NegativeCodesWarning, detect_format, export_sae, import_foreign_sae, read_foreign_sae
from sae.model import TopKSAE
from script_runner import run_script_in_process

D, N, K = 12, 40, 4


def saelens_forward(t: dict, cfg: dict, x: torch.Tensor) -> torch.Tensor:
    """SAELens' top-k SAE: top-k of the pre-activations, then ReLU, scattered; dense decode."""
    sae_in = x - t["b_dec"] * float(cfg["apply_b_dec_to_input"])
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    top = torch.topk(pre, cfg["k"], dim=-1)
    acts = torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
    return acts @ t["W_dec"] + t["b_dec"]


def sparsify_forward(t: dict, cfg: dict, x: torch.Tensor) -> torch.Tensor:
    """sparsify's SparseCoder: ReLU of the linear encoder of x - b_dec, top-k, decode with W_dec."""
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    top = torch.topk(pre, cfg["k"], dim=-1)
    acts = torch.zeros_like(pre).scatter_(-1, top.indices, top.values)
    return acts @ t["W_dec"] + t["b_dec"]


def random_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1)
    return {"W_enc": torch.randn(D, N, generator=g) * 0.5, "b_enc": torch.randn(N, generator=g) * 0.1,
            "W_dec": W_dec, "b_dec": torch.randn(D, generator=g) * 0.1}


def write_saelens(path, t, apply_b_dec=True, **extra):
    path.mkdir()
    save_file({k: v.contiguous() for k, v in t.items()}, str(path / "sae_weights.safetensors"))
    cfg = {"architecture": "topk", "d_in": D, "d_sae": N, "k": K, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none", "reshape_activations": "none",
           "meta": {"model_name": "vit_base_patch16_clip_224.openai", "hook_name": None}, **extra}
    (path / "cfg.json").write_text(json.dumps(cfg))
    return cfg


def write_sparsify(path, t, **extra):
    path.mkdir()
    tensors = {"encoder.weight": t["W_enc"].T.contiguous(), "encoder.bias": t["b_enc"], "W_dec": t["W_dec"],
               "b_dec": t["b_dec"]}
    save_file(tensors, str(path / "sae.safetensors"))
    cfg = {"activation": "topk", "expansion_factor": 4, "normalize_decoder": True, "num_latents": N, "k": K,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D, **extra}
    (path / "cfg.json").write_text(json.dumps(cfg))
    return cfg


def x_batch(seed=5, n=64):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_directory_imports_to_the_same_function(tmp_path, apply_b_dec):
    t = random_tensors(0)
    cfg = write_saelens(tmp_path / "lens", t, apply_b_dec=apply_b_dec)
    assert detect_format(tmp_path / "lens") == "saelens"
    import_foreign_sae(tmp_path / "lens", tmp_path / "ours")
    model = load_sae(tmp_path / "ours")
    assert model.config.subtract_decoder_bias == apply_b_dec and model.config.variant == "topk"
    x = x_batch()
    with torch.no_grad():
        ours = model(x).recon
    torch.testing.assert_close(ours, saelens_forward(t, cfg, x), rtol=1e-5, atol=1e-5)
    assert read_provenance(tmp_path / "ours") == {"backbone": "vit_base_patch16_clip_224.openai"}


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
    torch.testing.assert_close(ours, sparsify_forward(files, cfg, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_topk_sae_exports_and_comes_back_unchanged(tmp_path, fmt):
    torch.manual_seed(0)
    model = TopKSAE(SAEConfig(D, N, K))
    with torch.no_grad():
        model.b_enc.normal_(0, 0.1), model.b_dec.normal_(0, 0.1)
    prov = {"backbone": "resnet50", "output_kind": "pre_logits", "normalize": False, "preprocessing": None, "d": D}
    export_sae(model, tmp_path / fmt, fmt, provenance=prov)
    files = load_file(str(tmp_path / fmt / ("sae_weights.safetensors" if fmt == "saelens" else "sae.safetensors")))
    cfg = json.loads((tmp_path / fmt / "cfg.json").read_text())
    if fmt == "saelens":
        assert {k: tuple(v.shape) for k, v in files.items()} == {
            "W_enc": (D, N), "b_enc": (N,), "W_dec": (N, D), "b_dec": (D,)}
        assert cfg["architecture"] == "topk" and cfg["d_sae"] == N and cfg["meta"]["model_name"] == "resnet50"
        reference = saelens_forward(files, cfg, x_batch())
    else:
        assert {k: tuple(v.shape) for k, v in files.items()} == {
            "encoder.weight": (N, D), "encoder.bias": (N,), "W_dec": (N, D), "b_dec": (D,)}
        assert cfg["num_latents"] == N and cfg["activation"] == "topk" and cfg["d_in"] == D
        reference = sparsify_forward(files, cfg, x_batch())
    with torch.no_grad():
        torch.testing.assert_close(model(x_batch()).recon, reference, rtol=1e-5, atol=1e-5)
    back, back_prov = read_foreign_sae(tmp_path / fmt)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(model, name)), name
    assert back.config == model.config and back_prov == prov


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
    files = load_file(str(tmp_path / fmt / ("sae_weights.safetensors" if fmt == "saelens" else "sae.safetensors")))
    cfg = json.loads((tmp_path / fmt / "cfg.json").read_text())
    forward = saelens_forward if fmt == "saelens" else sparsify_forward
    with torch.no_grad():
        torch.testing.assert_close(forward(files, cfg, x), model(x).recon, rtol=1e-4, atol=1e-4)


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


def test_foreign_directories_that_are_not_plain_topk_saes_are_refused(tmp_path):
    t = random_tensors(2)
    write_saelens(tmp_path / "std", t, architecture="standard")
    with pytest.raises(ArtifactError, match="architecture 'standard'"):
        read_foreign_sae(tmp_path / "std")
    write_saelens(tmp_path / "norm", t, normalize_activations="layer_norm")
    with pytest.raises(ArtifactError, match="normalize_activations"):
        read_foreign_sae(tmp_path / "norm")
    write_sparsify(tmp_path / "skip", t, skip_connection=True)
    with pytest.raises(ArtifactError, match="skip_connection"):
        read_foreign_sae(tmp_path / "skip")
    write_sparsify(tmp_path / "wide", t, num_latents=N + 1)
    with pytest.raises(ArtifactError, match="shape"):
        read_foreign_sae(tmp_path / "wide")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="neither"):
        detect_format(tmp_path / "empty")


def test_our_directory_exports_with_its_recorded_provenance(tmp_path):
    model = TopKSAE(SAEConfig(D, N, K))
    prov = {"backbone": "digits-cnn", "output_kind": "pre_logits", "normalize": False, "preprocessing": {}, "d": D}
    save_sae(model, tmp_path / "ours", provenance=prov)
    export_sae(load_sae(tmp_path / "ours"), tmp_path / "out", "saelens", provenance=read_provenance(tmp_path / "ours"))
    assert json.loads((tmp_path / "out" / "cfg.json").read_text())["provenance"] == prov


def test_real_sparsify_loads_our_export_when_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder is GPU-only
    sparsify = pytest.importorskip("sparsify")
    model = TopKSAE(SAEConfig(D, N, K))
    export_sae(model, tmp_path / "s", "sparsify")
    coder = sparsify.SparseCoder.load_from_disk(tmp_path / "s")
    x = x_batch()
    with torch.no_grad():
        out = coder.decode(*coder.encode(x)[:2])
        torch.testing.assert_close(out, model(x).recon, rtol=1e-5, atol=1e-5)


def run_script(name: str, *argv: str, capsys) -> tuple[int, str, str]:
    return run_script_in_process(name, *argv, capsys=capsys)


def test_scripts_export_and_import_and_refuse_in_one_line(tmp_path, capsys):
    from embeddings.store import write_store

    save_sae(paper_model(nonnegative=False), tmp_path / "paper")
    store = write_store(tmp_path / "store", x_batch().numpy())
    code, _, err = run_script("export_sae.py", "--sae", str(tmp_path / "paper"), "--format", "sparsify",
                              "--out", str(tmp_path / "eai"), "--check-store", str(store.store_dir), capsys=capsys)
    assert code == 2 and err.startswith("error: ") and "--allow-negative" in err and err.count("\n") == 1
    save_sae(TopKSAE(SAEConfig(D, N, K)), tmp_path / "topk")
    code, out, err = run_script("export_sae.py", "--sae", str(tmp_path / "topk"), "--format", "saelens",
                                "--out", str(tmp_path / "lens"), capsys=capsys)
    assert code == 0 and "saelens layout" in out, err
    code, out, err = run_script("import_sae.py", "--from", str(tmp_path / "lens"), "--out", str(tmp_path / "back"),
                                capsys=capsys)
    assert code == 0, err
    assert torch.equal(load_sae(tmp_path / "back").W_enc, load_sae(tmp_path / "topk").W_enc)
