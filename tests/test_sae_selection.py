"""The bf16 filter chooses the float32 latents (against the plain selection and the dense twin), and how a run
decides between the two ways."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sae.precision
import sae.selection
from sae.config import SAEConfig
from sae.model import TopKSAE
from sae.precision import choose_precision
from sae.reference import DenseTopKSAE
from sae.selection import filter_error_bound, select_filtered, select_plain

SETTINGS = settings(max_examples=25, deadline=None)


def operands(d, n, b, seed, w_scale=1.0, bias=0.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=gen)
    W = torch.randn(d, n, generator=gen) * w_scale / d**0.5
    b_enc = bias * torch.randn(n, generator=gen)
    return x, W, b_enc


@SETTINGS
@given(
    st.integers(2, 40),  # d
    st.sampled_from([8, 64, 256, 1024]),  # n
    st.integers(1, 30),  # b
    st.integers(1, 8),  # k
    st.sampled_from([0.01, 1.0, 30.0]),  # encoder scale
    st.sampled_from([0.0, 0.1, 3.0]),  # bias scale
    st.booleans(),  # dropout
    st.integers(0, 2**16),
)
def test_filter_chooses_the_float32_latents(d, n, b, k, w_scale, bias, dropout, seed):
    k = min(k, n)
    x, W, b_enc = operands(d, n, b, seed, w_scale, bias)
    scale = None
    if dropout:
        scale = (torch.rand(b, n, generator=torch.Generator().manual_seed(seed + 1)) >= 0.5).float() * 2.0
    dead = torch.arange(0, n, 3)
    pre = x.double() @ W.double() + b_enc.double()
    ranked = pre if scale is None else pre * scale.double()
    tol = 1e-5 * (1.0 + pre.abs().max().item())
    for kernels in (True, False):  # the CPU kernels, and the torch operations that other devices run
        sae.selection.KERNELS = kernels
        try:
            idx_p, raw_p, dead_p = select_plain(x, W, b_enc, k, scale, dead)
            idx_f, raw_f, dead_f, _ = select_filtered(x, W, b_enc, k, scale, dead, max_scale=2.0)
        finally:
            sae.selection.KERNELS = True
        # The same chosen values (indices may differ only where float32 values tie), exact to float32 rounding.
        best = ranked.topk(k, dim=1).values
        for idx, raw in ((idx_p, raw_p), (idx_f, raw_f)):
            torch.testing.assert_close(ranked.gather(1, idx), best, rtol=0, atol=tol)
            torch.testing.assert_close(raw.double(), pre.gather(1, idx), rtol=0, atol=tol)
            assert all(len(set(row.tolist())) == k for row in idx)
        assert dead_f.dtype == torch.bfloat16
        bound = filter_error_bound(x, W, b_enc).max().item()
        torch.testing.assert_close(dead_f.double(), dead_p.double(), rtol=2**-7, atol=bound)


@pytest.fixture(params=["kernels", "torch"])
def way(request, monkeypatch):
    """The filter's CPU kernels, and its torch operations (the way it runs on other devices)."""
    monkeypatch.setattr(sae.selection, "KERNELS", request.param == "kernels")
    return request.param


def test_rows_without_certificate_are_recomputed_exactly(monkeypatch):
    """With as many candidates as k the certificate fails on most rows; those rows take the float32 path."""
    monkeypatch.setattr(sae.selection, "KERNELS", False)
    monkeypatch.setattr(sae.selection, "CANDIDATES", 1)
    x, W, b_enc = operands(32, 512, 200, 5)
    idx_p, raw_p, _ = select_plain(x, W, b_enc, 8, None, None)
    idx_f, raw_f, _, n_exact = select_filtered(x, W, b_enc, 8, None, None)
    assert n_exact > 200 * 8 + 100 * 512  # over a hundred rows recomputed whole
    assert torch.equal(idx_f, idx_p)
    torch.testing.assert_close(raw_f, raw_p)


def test_error_bound_holds():
    """The filter's values stay within the bound of the float64 values, also for large weights and biases."""
    for seed, w_scale, bias in ((0, 1.0, 0.0), (1, 50.0, 2.0), (2, 1e-3, 0.0)):
        x, W, b_enc = operands(300, 700, 64, seed, w_scale, bias)
        lhs, rhs = sae.selection.encoder_operands(x, W, b_enc, torch.bfloat16)
        approx = (lhs @ rhs).double()
        exact = x.double() @ W.double() + b_enc.double()
        assert ((approx - exact).abs() <= filter_error_bound(x, W, b_enc)[:, None].double()).all()


@pytest.mark.parametrize("variant", ["topk", "paper", "topk-dropout"])
def test_bf16_model_agrees_with_dense_twin(monkeypatch, variant, way):
    """The whole forward and backward with the bf16 filter: the reconstruction path equals the float32 dense
    twin to float32 rounding; the auxiliary losses (bfloat16) to bfloat16 rounding."""
    monkeypatch.setattr(sae.selection, "CPU_BLOCK_ROWS", 32)  # several blocks
    config = {
        "topk": SAEConfig(24, 256, 6, auxk_k=20),
        "paper": SAEConfig.paper(24, 256, 6, ghost_coef=1.0),
        "topk-dropout": SAEConfig(24, 256, 6, dropout=0.3),
    }[variant]
    torch.manual_seed(0)
    fast = TopKSAE(config)
    dense = DenseTopKSAE(config)
    dense.load_state_dict(fast.state_dict())
    fast.precision = "bf16"
    x = torch.randn(100, 24)
    dead = torch.rand(256) < 0.2
    outs, grads = [], []
    for model in (fast, dense):
        torch.manual_seed(1)  # the same dropout masks
        out = model(x, dead_mask=dead)
        out.loss.backward()
        outs.append(out)
        grads.append({name: p.grad for name, p in model.named_parameters()})
    (f, d), (gf, gd) = outs, grads
    torch.testing.assert_close(dense.dense_code(f.values, f.indices), dense.dense_code(d.values, d.indices))
    torch.testing.assert_close(f.recon, d.recon)
    torch.testing.assert_close(f.fvu, d.fvu)
    torch.testing.assert_close(f.aux, d.aux, rtol=2e-2, atol=1e-6)
    assert f.aux.item() > 0
    for name in gd:
        torch.testing.assert_close(gf[name], gd[name], rtol=3e-2, atol=3e-2 * gd[name].abs().max().item(), msg=name)


def test_choice_is_requested_or_measured(monkeypatch):
    model = TopKSAE(SAEConfig(512, 4096, 16))
    x = torch.randn(64, 512)
    assert choose_precision("bf16", model, x, 4096, 16)["precision"] == "bf16"
    assert choose_precision("fp32", model, x, 4096, 16)["reason"] == "requested"
    small = choose_precision("auto", TopKSAE(SAEConfig(64, 512, 4)), x[:, :64], 512, 4)
    assert small["precision"] == "fp32" and "too small" in small["reason"] and "bf16_ms" not in small
    monkeypatch.setattr(sae.precision, "native_bf16", lambda device: False)
    assert "no native" in choose_precision("auto", model, x, 4096, 16)["reason"]
    monkeypatch.setattr(sae.precision, "native_bf16", lambda device: True)
    for fp32_ms, bf16_ms, expected in ((10.0, 4.0, "bf16"), (10.0, 9.5, "fp32"), (10.0, 20.0, "fp32")):
        times = {"fp32_ms": fp32_ms, "bf16_ms": bf16_ms, "rows": 64}
        monkeypatch.setattr(sae.precision, "time_selection", lambda *a, t=times: t)
        record = choose_precision("auto", model, x, 4096, 16)
        assert record["precision"] == expected and record["fp32_ms"] == fp32_ms
    with pytest.raises(ValueError, match="--precision"):
        choose_precision("fp16", model, x, 4096, 16)


def test_time_selection_measures_both_and_restores_the_model():
    model = TopKSAE(SAEConfig(16, 128, 4))
    times = sae.precision.time_selection(model, torch.randn(40, 16), 4, repeats=2)
    assert times["rows"] == 40 and times["fp32_ms"] > 0 and times["bf16_ms"] > 0
    assert model.precision == "fp32"


def test_training_records_the_choice_and_resumes_with_it(tmp_path, monkeypatch):
    """The choice is recorded in meta.json, and a resumed run keeps it instead of measuring again."""
    import numpy as np

    import sae.trainer
    from sae.train import RunConfig, TrainConfig, train_sae

    x = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    quiet = RunConfig(progress=False, checkpoint_every=5)
    config = SAEConfig(16, 64, 4)
    res = train_sae(x, tmp_path / "a", config, TrainConfig(n_steps=10, batch_size=50, precision="bf16"), quiet)
    meta = json.loads((res.out_dir / "meta.json").read_text())
    assert meta["precision"] == {"requested": "bf16", "precision": "bf16", "reason": "requested"}
    auto = train_sae(x, tmp_path / "b", config, TrainConfig(n_steps=10, batch_size=50), quiet)
    assert json.loads((auto.out_dir / "meta.json").read_text())["precision"]["precision"] == "fp32"

    def interrupt(self):
        if self.step_ == 7:
            raise KeyboardInterrupt

    monkeypatch.setattr(sae.trainer, "choose_precision", lambda *a: {"precision": "bf16", "reason": "first"})
    monkeypatch.setattr(sae.trainer.Trainer, "validate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_sae(x, tmp_path / "c", config, TrainConfig(n_steps=10, batch_size=50), quiet)
    monkeypatch.undo()
    monkeypatch.setattr(sae.trainer, "choose_precision", lambda *a: {"precision": "fp32", "reason": "second"})
    resumed = train_sae(x, tmp_path / "c", config, TrainConfig(n_steps=10, batch_size=50), quiet, resume=True)
    assert resumed.resumed_from_step == 5
    assert json.loads((resumed.out_dir / "meta.json").read_text())["precision"]["reason"] == "first"
