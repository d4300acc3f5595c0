"""TopKSAE: codes, sparse decode and sparse backward against the dense twin, decoder constraints."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sae.config import SAEConfig
from sae.model import TopKSAE, geometric_median
from sae.reference import DenseTopKSAE
from sae.sparse import gather_pre, sparse_decode

SETTINGS = settings(max_examples=20, deadline=None)


def make_pair(config: SAEConfig, seed: int, dtype=torch.float64):
    """A fast model and its dense twin with identical, perturbed parameters."""
    torch.manual_seed(seed)
    fast = TopKSAE(config).to(dtype)
    with torch.no_grad():
        fast.b_enc.normal_(0.0, 0.1)
        fast.b_dec.normal_(0.0, 0.5)
        fast.W_enc.add_(0.1 * torch.randn_like(fast.W_enc))
        fast.W_dec.mul_(1.0 + torch.rand(config.n_latents, 1, dtype=dtype))
    dense = DenseTopKSAE(config).to(dtype)
    dense.load_state_dict(fast.state_dict())
    return fast, dense


def run(model, x, seed, **kw):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout mask in both models
    out = model(x, **kw)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


shapes = st.tuples(
    st.integers(2, 12),  # d_in
    st.integers(4, 40),  # n_latents
    st.integers(1, 12),  # batch
    st.integers(0, 2**16),  # seed
)


@SETTINGS
@given(shapes, st.integers(1, 8))
def test_codes_exactly_k_sorted_valid(shape, k):
    d, n, b, seed = shape
    k = min(k, n)
    for config in (SAEConfig(d, n, k), SAEConfig.paper(d, n, k)):
        torch.manual_seed(seed)
        model = TopKSAE(config).eval()
        x = torch.randn(b, d)
        values, indices = model.encode(x)
        assert values.shape == (b, k) and indices.shape == (b, k) and indices.dtype == torch.int64
        assert (indices >= 0).all() and (indices < n).all()
        assert all(len(set(row.tolist())) == k for row in indices)
        assert (values[:, :-1] >= values[:, 1:]).all()
        if config.variant == "topk":
            assert (values >= 0).all()
        out = model(x)
        torch.testing.assert_close(out.recon, model.decode(values, indices))
        assert torch.equal(out.indices, indices)


@SETTINGS
@given(shapes, st.integers(1, 6), st.sampled_from(["topk", "paper", "topk-dropout", "topk-nobias"]), st.booleans())
def test_fast_forward_and_gradients_equal_dense_twin(shape, k, variant, with_dead):
    d, n, b, seed = shape
    k = min(k, n)
    config = {
        "topk": SAEConfig(d, n, k, auxk_k=max(n // 3, 1)),
        "paper": SAEConfig.paper(d, n, k),
        "topk-dropout": SAEConfig(d, n, k, dropout=0.3),
        "topk-nobias": SAEConfig(d, n, k, subtract_decoder_bias=False),
    }[variant]
    fast, dense = make_pair(config, seed)
    x = torch.randn(b, d, dtype=torch.float64) + 0.3
    dead = None
    if with_dead:
        dead = torch.rand(n) < 0.5
        dead[seed % n] = True
    x_var = None if seed % 2 else 1.7
    out_f, grads_f = run(fast, x, seed + 1, dead_mask=dead, x_var=x_var)
    out_d, grads_d = run(dense, x, seed + 1, dead_mask=dead, x_var=x_var)
    torch.testing.assert_close(out_f.values, out_d.values)
    # Indices agree except where values tie (ReLU zeros); the dense codes always agree.
    torch.testing.assert_close(dense.dense_code(out_f.values, out_f.indices), dense.dense_code(out_d.values, out_d.indices))
    torch.testing.assert_close(out_f.recon, out_d.recon)
    for name in ("fvu", "recon_loss", "aux", "loss"):
        torch.testing.assert_close(getattr(out_f, name), getattr(out_d, name), msg=name)
    if with_dead and config.auxk_coef > 0:
        assert out_f.aux.item() > 0
    scale = max(1.0, out_d.loss.abs().item())
    for name in grads_d:
        torch.testing.assert_close(grads_f[name] / scale, grads_d[name] / scale, rtol=1e-7, atol=1e-9, msg=name)


def test_float32_agrees_within_tolerance():
    config = SAEConfig(32, 256, 8, auxk_k=16)
    fast, dense = make_pair(config, 3, dtype=torch.float32)
    x = torch.randn(64, 32)
    dead = torch.rand(256) < 0.3
    out_f, grads_f = run(fast, x, 0, dead_mask=dead)
    out_d, grads_d = run(dense, x, 0, dead_mask=dead)
    torch.testing.assert_close(out_f.loss, out_d.loss, rtol=1e-5, atol=1e-6)
    for name in grads_d:
        torch.testing.assert_close(grads_f[name], grads_d[name], rtol=1e-4, atol=1e-5, msg=name)


def test_no_dead_latents_means_no_aux_loss():
    model = TopKSAE(SAEConfig(6, 20, 3))
    x = torch.randn(5, 6)
    out = model(x, dead_mask=torch.zeros(20, dtype=torch.bool))
    assert out.aux.item() == 0.0
    torch.testing.assert_close(out.loss, out.fvu)


def test_k_override_and_validation():
    model = TopKSAE(SAEConfig(6, 20, 3))
    x = torch.randn(4, 6)
    assert model.encode(x, k=7)[0].shape == (4, 7)
    assert model(x, k=9).indices.shape == (4, 9)
    with pytest.raises(ValueError, match="k must be"):
        model.encode(x, k=21)
    with pytest.raises(ValueError, match=r"\(b, 6\)"):
        model.encode(torch.randn(4, 5))
    with pytest.raises(ValueError, match="dead_mask"):
        model(x, dead_mask=torch.zeros(3, dtype=torch.bool))


def vjp(fn, inputs, cotangent):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, cotangent)
    return out.detach(), grads


@SETTINGS
@given(shapes, st.integers(1, 6))
def test_sparse_primitives_equal_dense(shape, k):
    d, n, b, seed = shape
    k = min(k, n)
    torch.manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    indices = torch.stack([torch.randperm(n)[:k] for _ in range(b)])
    W_dec, values = torch.randn(n, d, **f64), torch.randn(b, k, **f64)
    cot = torch.randn(b, d, **f64)
    out_s, grads_s = vjp(lambda v, w: sparse_decode(v, indices, w), (values, W_dec), cot)
    out_d, grads_d = vjp(lambda v, w: torch.zeros(b, n, **f64).scatter(1, indices, v) @ w, (values, W_dec), cot)
    torch.testing.assert_close(out_s, out_d)
    for g_s, g_d in zip(grads_s, grads_d):
        torch.testing.assert_close(g_s, g_d)

    x, W_enc = torch.randn(b, d, **f64), torch.randn(d, n, **f64)
    b_enc, b_dec = torch.randn(n, **f64), torch.randn(d, **f64)
    cot = torch.randn(b, k, **f64)

    def fast(x, W_enc, b_enc, b_dec):
        with torch.no_grad():
            gathered = ((x - b_dec) @ W_enc + b_enc).gather(1, indices)
        return gather_pre(x, W_enc, b_enc, b_dec, indices, gathered)

    def dense(x, W_enc, b_enc, b_dec):
        return ((x - b_dec) @ W_enc + b_enc).gather(1, indices)

    out_s, grads_s = vjp(fast, (x, W_enc, b_enc, b_dec), cot)
    out_d, grads_d = vjp(dense, (x, W_enc, b_enc, b_dec), cot)
    torch.testing.assert_close(out_s, out_d)
    for g_s, g_d in zip(grads_s, grads_d):
        torch.testing.assert_close(g_s, g_d)


def test_normalize_decoder_and_parallel_grad_removal():
    model = TopKSAE(SAEConfig(8, 30, 4))
    torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(30))
    torch.testing.assert_close(model.W_enc, model.W_dec.t())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(50, 8)
    for _ in range(5):
        opt.zero_grad()
        model(x, dead_mask=torch.rand(30) < 0.5).loss.backward()
        model.remove_parallel_grad_()
        dots = (model.W_dec.grad * model.W_dec).sum(1)
        assert dots.abs().max() < 1e-5
        opt.step()
        model.normalize_decoder_()
        torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(30))


def test_paper_variant_quirks():
    """Authors' model: no ReLU (negative values possible), dropout only in training, normalised decoder."""
    config = SAEConfig.paper(6, 12, 10)
    model = TopKSAE(config)
    with torch.no_grad():
        model.W_dec.mul_(3.0)  # the forward must not depend on the decoder rows' norms
    x = torch.randn(20, 6)
    model.eval()
    values, indices = model.encode(x)
    assert (values < 0).any()  # 10 of 12 latents: some selected pre-activations are negative
    a = model.decode(values, indices)
    manual = torch.zeros(20, 12).scatter(1, indices, values) @ torch.nn.functional.normalize(model.W_dec, dim=1) + model.b_dec
    torch.testing.assert_close(a, manual)
    model.train()
    torch.manual_seed(0)
    v1, _ = model.encode(x)
    torch.manual_seed(1)
    v2, _ = model.encode(x)
    assert not torch.equal(v1, v2)  # dropout active in training
    model.eval()
    assert torch.equal(model.encode(x)[0], model.encode(x)[0])
    w = model.W_dec.clone()
    model.normalize_decoder_()
    assert torch.equal(model.W_dec, w)  # the authors never renormalise the stored weights


def test_init_from_data():
    model = TopKSAE(SAEConfig(3, 8, 2))
    x = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [100, 100, 100]])
    model.init_from_data_(x, method="mean")
    torch.testing.assert_close(model.b_dec, x.mean(0))
    model.init_from_data_(x)
    med = model.b_dec.detach()
    # The geometric median ignores the outlier and beats the mean on the sum of distances.
    assert med.norm() < 1.0
    assert (x - med).norm(dim=1).sum() < (x - x.mean(0)).norm(dim=1).sum()
    for _ in range(3):
        probe = med + 0.05 * torch.randn(3)
        assert (x - med).norm(dim=1).sum() <= (x - probe).norm(dim=1).sum() + 1e-4
    torch.testing.assert_close(geometric_median(torch.ones(4, 2)), torch.ones(2))
    with pytest.raises(ValueError, match="geometric_median"):
        model.init_from_data_(x, method="median")


def test_config_validation_names_flags():
    with pytest.raises(ValueError, match="--k"):
        SAEConfig(4, 8, 9)
    with pytest.raises(ValueError, match="--n-latents"):
        SAEConfig(4, 0, 1)
    with pytest.raises(ValueError, match="--variant"):
        SAEConfig(4, 8, 2, variant="relu")
    with pytest.raises(ValueError, match="--dropout"):
        SAEConfig(4, 8, 2, dropout=1.0)
    c = SAEConfig.paper(4, 8, 2)
    assert SAEConfig.from_dict(c.to_dict()) == c
    assert SAEConfig(512, 4096, 16).auxk_k_effective == 256


def test_bf16_autocast_runs_and_is_close():
    model = TopKSAE(SAEConfig(16, 64, 4))
    x = torch.randn(32, 16)
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, dead_mask=torch.rand(64) < 0.5)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    assert abs(out.fvu.item() - ref.fvu.item()) < 0.05


@pytest.mark.parametrize("variant", ["topk", "paper", "topk-dropout"])
def test_blocked_selection_equals_dense_twin(monkeypatch, variant):
    """The CPU encoder runs in row blocks; several blocks must give the same codes and gradients."""
    import sae.selection

    monkeypatch.setattr(sae.selection, "CPU_BLOCK_ROWS", 4)
    config = {
        "topk": SAEConfig(6, 30, 3, auxk_k=7),
        "paper": SAEConfig.paper(6, 30, 3),
        "topk-dropout": SAEConfig(6, 30, 3, dropout=0.4),
    }[variant]
    fast, dense = make_pair(config, 11)
    x = torch.randn(11, 6, dtype=torch.float64)
    dead = torch.rand(30) < 0.4
    out_f, grads_f = run(fast, x, 5, dead_mask=dead)
    out_d, grads_d = run(dense, x, 5, dead_mask=dead)
    torch.testing.assert_close(out_f.values, out_d.values)
    torch.testing.assert_close(out_f.loss, out_d.loss)
    for name in grads_d:
        torch.testing.assert_close(grads_f[name], grads_d[name], rtol=1e-7, atol=1e-7, msg=name)


def test_column_pre_gradients_including_input():
    from sae.sparse import column_pre

    torch.manual_seed(2)
    f64 = dict(dtype=torch.float64)
    x, W_enc, b_enc, b_dec = torch.randn(7, 5, **f64), torch.randn(5, 12, **f64), torch.randn(12, **f64), torch.randn(5, **f64)
    cols = torch.tensor([1, 4, 9])
    cot = torch.randn(7, 3, **f64)

    def fast(x, W_enc, b_enc, b_dec):
        with torch.no_grad():
            gathered = ((x - b_dec) @ W_enc + b_enc)[:, cols]
        return column_pre(x, W_enc, b_enc, b_dec, cols, gathered)

    out_s, grads_s = vjp(fast, (x, W_enc, b_enc, b_dec), cot)
    out_d, grads_d = vjp(lambda x, W, be, bd: ((x - bd) @ W + be)[:, cols], (x, W_enc, b_enc, b_dec), cot)
    torch.testing.assert_close(out_s, out_d)
    for g_s, g_d in zip(grads_s, grads_d):
        torch.testing.assert_close(g_s, g_d)


@SETTINGS
@given(st.integers(1, 8), st.sampled_from([64, 256, 1024]), st.integers(1, 9), st.integers(0, 2**16))
def test_two_stage_topk_equals_torch_topk(k, n, b, seed):
    """The CPU two-stage top-k returns the values of torch.topk, also with ties and repeated values."""
    from sae.selection import topk_indices

    gen = torch.Generator().manual_seed(seed)
    pre = torch.randn(b, n, generator=gen, dtype=torch.float64)
    if seed % 3 == 0:
        pre = pre.round()  # many ties
    if seed % 3 == 1:
        pre = pre.clamp_max(0.0)  # most of each row ties at zero, as after a ReLU
    expected_values, expected = torch.topk(pre, k, dim=1, sorted=True)
    idx = topk_indices(pre, k)
    torch.testing.assert_close(pre.gather(1, idx), expected_values, rtol=0, atol=0)
    assert all(len(set(row.tolist())) == k for row in idx)
    if seed % 3 == 2:  # no ties: the very same indices
        assert torch.equal(idx, expected)


@pytest.mark.parametrize("variant", ["topk", "topk-dropout"])
@pytest.mark.parametrize("dead_bias", [-1.0, 0.0, 1.0])
@pytest.mark.parametrize("auxk_k", [10, 30])  # keep the k_aux largest, or drop the smallest (2 k_aux > n_dead)
def test_wide_model_equals_dense_twin(monkeypatch, variant, dead_bias, auxk_k):
    """Shapes where the two-stage top-k runs, with AuxK rows above and below k_aux positive dead latents."""
    import sae.selection

    monkeypatch.setattr(sae.selection, "CPU_BLOCK_ROWS", 16)
    extra = {"dropout": 0.3} if variant == "topk-dropout" else {}
    config = SAEConfig(8, 256, 4, auxk_k=auxk_k, **extra)
    fast, dense = make_pair(config, 7)
    dead = torch.rand(256) < 0.15
    with torch.no_grad():  # shift the dead latents so that few, about half, or most of them fire
        for model in (fast, dense):
            model.b_enc[dead] += dead_bias
    x = torch.randn(40, 8, dtype=torch.float64)
    out_f, grads_f = run(fast, x, 3, dead_mask=dead)
    out_d, grads_d = run(dense, x, 3, dead_mask=dead)
    torch.testing.assert_close(out_f.values, out_d.values)
    torch.testing.assert_close(out_f.indices, out_d.indices)
    torch.testing.assert_close(out_f.loss, out_d.loss)
    assert out_f.aux.item() > 0
    for name in grads_d:
        torch.testing.assert_close(grads_f[name], grads_d[name], rtol=1e-7, atol=1e-9, msg=name)


def test_blocked_selection_under_autocast_matches_one_block(monkeypatch):
    """Under autocast the blocked CPU encoder keeps the autocast matmul (no float32 out= buffer)."""
    import sae.selection

    model = TopKSAE(SAEConfig(16, 64, 4))
    x = torch.randn(40, 16)
    dead = torch.rand(64) < 0.3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        one = model(x, dead_mask=dead)
        monkeypatch.setattr(sae.selection, "CPU_BLOCK_ROWS", 8)
        blocked = model(x, dead_mask=dead)
    assert torch.equal(one.indices, blocked.indices)
    torch.testing.assert_close(one.loss, blocked.loss, rtol=0, atol=0)


def test_remove_parallel_grad_projects_out_each_row():
    """The projection g - (g.w / w.w) w, also for rows that are not unit norm."""
    model = TopKSAE(SAEConfig(6, 20, 3)).double()
    with torch.no_grad():
        model.W_dec.mul_(torch.rand(20, 1, dtype=torch.float64) + 0.5)
    g = torch.randn(20, 6, dtype=torch.float64)
    model.W_dec.grad = g.clone()
    model.remove_parallel_grad_()
    w = model.W_dec.detach()
    expected = g - ((g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True)) * w
    torch.testing.assert_close(model.W_dec.grad, expected)
