"""Local TTT: the reference loop's protocol, the batched modes against it, and when TTT helps."""

import copy

import numpy as np
import pytest
import torch

from analysis import batched_ttt, local_ttt
from analysis.batched_ttt import stacked_adam
from analysis.heads import HeadConfig, head_loss, train_head
from analysis.stats import accuracy, paired_difference
from analysis.local_ttt import LocalTTT, TTTConfig, choose_precision, knn_majority, run_local
from analysis.ttt.data import SparseTopics, isotropic, sparse_topics

IMPLS = ["reference", "exact", "fast"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def topics():
    x, y, _ = sparse_topics(SparseTopics(n=3000))
    head = train_head(x[:2500], y[:2500], HeadConfig(epochs=50, batch_size=100))
    return x, y, head


def _ttt(head, x, y, **kw):
    return LocalTTT(head, TTTConfig(**kw)).fit(x[:2500], y[:2500])


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_steps_is_the_global_head(topics, impl):
    x, y, head = topics
    r = _ttt(head, x, y, n_neighbours=10, steps=0, impl=impl).predict(x[2500:2540])
    assert np.array_equal(r.predictions, r.global_predictions)
    assert np.all(r.update_norm == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["erm", "sequential"])
def test_global_head_untouched_and_runs_repeat(topics, impl, mode):
    x, y, head = topics
    before = copy.deepcopy(head.state_dict())
    ttt = _ttt(head, x, y, n_neighbours=8, steps=5, impl=impl, mode=mode)
    a, b = ttt.predict(x[2500:2520]), ttt.predict(x[2500:2520])
    for k, v in head.state_dict().items():
        assert torch.equal(v, before[k])
    assert np.array_equal(a.predictions, b.predictions)
    assert np.array_equal(a.loss_curve, b.loss_curve)
    assert (a.update_norm > 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_sequential_visits_neighbours_nearest_first(topics, impl):
    x, y, head = topics
    ttt = _ttt(head, x, y, n_neighbours=6, impl=impl, mode="sequential", lr=0.05)
    r = ttt.predict(x[2500:2503])
    assert r.loss_curve.shape == (3, 6)
    for i in range(3):
        nb = r.neighbours[i]
        layer = copy.deepcopy(head.last)
        opt = torch.optim.Adam(layer.parameters(), lr=0.05)
        for j in range(3):  # replay the first steps in nearest-first order
            loss = head_loss("classification", layer(torch.from_numpy(x[nb[j:j + 1]])), torch.from_numpy(y[nb[j:j + 1]]))
            # fast moves absent classes by one shared shift, so after the first step it is only close
            rel = 1e-3 if impl == "fast" else 1e-4
            assert loss.item() == pytest.approx(r.loss_curve[i, j], rel=rel, abs=1e-6)
            opt.zero_grad()
            loss.backward()
            opt.step()


def test_exact_equals_reference_and_fast_agrees(topics):
    x, y, head = topics
    q = x[2500:2700]
    ref = _ttt(head, x, y, n_neighbours=30, impl="reference").predict(q)
    exact = _ttt(head, x, y, n_neighbours=30, impl="exact", precision="float32").predict(q)
    fast = _ttt(head, x, y, n_neighbours=30, impl="fast", precision="float32").predict(q)
    assert np.array_equal(ref.neighbours, exact.neighbours)
    assert (ref.predictions == exact.predictions).mean() >= 0.995
    np.testing.assert_allclose(exact.loss_curve, ref.loss_curve, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(exact.update_norm, ref.update_norm, rtol=1e-3)
    assert (fast.predictions == exact.predictions).mean() >= 0.99
    np.testing.assert_allclose(fast.final_loss, exact.final_loss, rtol=0.05, atol=1e-3)


def test_fast_is_exact_when_every_class_is_present():
    # With all classes among the neighbours there is nothing to share: fast trains exactly the exact mode's rows.
    x, y = isotropic(n=600, dim=6, n_classes=3, seed=2)
    head = train_head(x[:500], y[:500], HeadConfig(epochs=2))
    kw = dict(n_neighbours=40, steps=20)
    runs = {impl: LocalTTT(head, TTTConfig(impl=impl, **kw)).fit(x[:500], y[:500]).predict(x[500:])
            for impl in IMPLS}
    fast, exact, ref = runs["fast"], runs["exact"], runs["reference"]
    all_present = np.array([len(set(y[nb])) == 3 for nb in exact.neighbours])
    assert all_present.mean() > 0.5
    for twin in (exact, ref):
        np.testing.assert_allclose(fast.loss_curve[all_present], twin.loss_curve[all_present], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(fast.update_norm[all_present], twin.update_norm[all_present], rtol=1e-4)
        assert np.array_equal(fast.predictions[all_present], twin.predictions[all_present])


@pytest.mark.parametrize("impl", ["exact", "fast"])
def test_results_do_not_depend_on_how_the_queries_are_chunked(topics, impl, monkeypatch):
    x, y, head = topics
    ttt = _ttt(head, x, y, n_neighbours=12, steps=8, impl=impl, precision="float32")
    whole = ttt.predict(x[2500:2560])
    monkeypatch.setattr(batched_ttt, "FAST_CHUNK", 7)                      # fast: sorted chunks of 7
    monkeypatch.setattr(batched_ttt, "EXACT_BLOCK_BYTES", 5 * 16 * 16 * 33)  # exact: blocks of 5 heads
    assert batched_ttt.exact_block(16, 32) == 5
    chunked = ttt.predict(x[2500:2560])
    assert np.array_equal(chunked.predictions, whole.predictions)
    for key in ("final_loss", "update_norm", "loss_curve"):
        np.testing.assert_allclose(getattr(chunked, key), getattr(whole, key), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", ["exact", "fast"])
def test_chunks_on_threads_equal_chunks_in_turn(topics, impl, monkeypatch):
    x, y, head = topics
    ttt = _ttt(head, x, y, n_neighbours=12, steps=8, impl=impl, precision="float32")
    monkeypatch.setattr(batched_ttt, "FAST_CHUNK", 7)
    monkeypatch.setattr(batched_ttt, "EXACT_BLOCK_BYTES", 5 * 16 * 16 * 33)
    in_turn = ttt.predict(x[2500:2560])                                    # one torch thread: chunks in turn
    torch.set_num_threads(2)
    on_threads = ttt.predict(x[2500:2560])                                 # a Python thread per torch thread
    assert torch.get_num_threads() == 2                                    # the caller's setting is back
    assert np.array_equal(on_threads.predictions, in_turn.predictions)
    for key in ("final_loss", "update_norm", "loss_curve"):
        np.testing.assert_allclose(getattr(on_threads, key), getattr(in_turn, key), rtol=1e-5, atol=1e-7)


def test_kept_weights_are_the_reference_heads(topics):
    x, y, head = topics
    config = TTTConfig(n_neighbours=10, steps=15, impl="exact", precision="float32")
    ttt = LocalTTT(head, config).fit(x[:2500], y[:2500])
    Z, t, q = ttt.local_problems(x[2500:2506], ttt.neighbours(x[2500:2506]), np.arange(6))
    with torch.no_grad():
        W, b = run_local(head.last, Z, t, q, config, "classification", keep_weights=True).weights
    for i in range(6):
        layer = copy.deepcopy(head.last)
        opt = torch.optim.Adam(layer.parameters(), lr=config.lr)
        for _ in range(config.steps):
            opt.zero_grad()
            head_loss("classification", layer(Z[i]), t[i]).backward()
            opt.step()
        torch.testing.assert_close(W[i], layer.weight.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b[i], layer.bias.detach(), rtol=1e-4, atol=1e-5)


def test_ttt_helps_on_locally_sparse_labels(topics):
    x, y, head = topics
    r = _ttt(head, x, y, n_neighbours=40, impl="exact").predict(x[2500:])
    t = y[2500:]
    gain = paired_difference(r.predictions == t, r.global_predictions == t)
    over_majority = paired_difference(r.predictions == t, r.majority == t)
    assert gain["value"] > 3 * gain["se"] and over_majority["value"] > 3 * over_majority["se"]


def test_ttt_does_not_help_on_isotropic_data():
    x, y = isotropic(n=3000, dim=32, n_classes=16)
    head = train_head(x[:2500], y[:2500], HeadConfig(epochs=50, batch_size=100))
    r = LocalTTT(head, TTTConfig(n_neighbours=40)).fit(x[:2500], y[:2500]).predict(x[2500:])
    t = y[2500:]
    assert accuracy(r.predictions == t)["value"] <= accuracy(r.global_predictions == t)["value"]


def test_regression_uses_mse_and_the_neighbour_mean():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 4)).astype(np.float32)
    t = np.sin(2 * x[:, 0]).astype(np.float32)  # locally linear, globally not
    head = train_head(x[:400], t[:400], HeadConfig(task="regression", epochs=20))
    r = LocalTTT(head, TTTConfig(n_neighbours=20, lr=0.05)).fit(x[:400], t[:400]).predict(x[400:])
    assert r.predictions.shape == (100,)
    np.testing.assert_allclose(r.majority, t[r.neighbours].mean(1), rtol=1e-5)
    assert np.mean((r.predictions - t[400:]) ** 2) < np.mean((r.global_predictions - t[400:]) ** 2)
    ref = LocalTTT(head, TTTConfig(n_neighbours=20, lr=0.05, impl="reference")).fit(x[:400], t[:400]).predict(x[400:420])
    np.testing.assert_allclose(ref.predictions, r.predictions[:20], rtol=1e-4, atol=1e-5)


def test_majority_ties_go_to_the_nearest():
    votes = np.array([[3, 1, 1, 3, 2], [2, 0, 0, 0, 2], [5, 4, 4, 5, 4]])
    assert knn_majority(votes).tolist() == [3, 0, 4]


def test_exclude_and_unfitted_and_config_errors(topics):
    x, y, head = topics
    ttt = LocalTTT(head, TTTConfig(n_neighbours=5))
    with pytest.raises(RuntimeError, match="not fitted"):
        ttt.predict(x[:3])
    ttt.fit(x[:2500], y[:2500])
    r = ttt.predict(x[:4], exclude=np.arange(4))
    assert not (r.neighbours == np.arange(4)[:, None]).any()
    with pytest.raises(ValueError, match="--impl"):
        TTTConfig(impl="magic")
    with pytest.raises(ValueError, match="--precision"):
        TTTConfig(impl="reference", precision="bfloat16")


def test_memory_bound_sets_the_query_batch(topics):
    x, y, head = topics
    small = LocalTTT(head, TTTConfig(n_neighbours=10), memory_bytes=200_000).fit(x[:2500], y[:2500])
    big = LocalTTT(head, TTTConfig(n_neighbours=10)).fit(x[:2500], y[:2500])
    assert small.batch_size() < big.batch_size()
    a, b = small.predict(x[2500:2600]), big.predict(x[2500:2600])
    assert np.array_equal(a.predictions, b.predictions)
    np.testing.assert_allclose(a.final_loss, b.final_loss, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_one_adam_over_the_stack_is_per_head_adam(fused):
    gen = torch.Generator().manual_seed(0)
    stack = torch.randn(3, 7, 5, generator=gen)
    heads = [torch.nn.Parameter(stack[i].clone()) for i in range(3)]
    per_head = [torch.optim.Adam([h], lr=0.01) for h in heads]   # what the reference loop runs
    opt = stacked_adam([stack], 0.01) if fused else torch.optim.Adam([stack], lr=0.01, foreach=True)
    for step in range(1, 30):
        g = torch.randn(3, 7, 5, generator=gen) * 10 ** -(step % 5)   # scales down to below Adam's eps
        stack.grad = g.clone()
        opt.step()
        for i in range(3):
            heads[i].grad = g[i].clone()
            per_head[i].step()
    assert bool(opt.defaults["fused"]) == fused and opt.defaults["weight_decay"] == 0
    for i in range(3):   # the kernels round differently (fused multiply-adds), never more than that
        torch.testing.assert_close(stack[i], heads[i].detach(), rtol=1e-6, atol=1e-7)


def test_mlp_head_trains_its_last_layer_on_hidden_neighbours(topics):
    x, y, _ = topics
    head = train_head(x[:2500], y[:2500], HeadConfig(kind="mlp", hidden=24, epochs=5, batch_size=100))
    ttt = LocalTTT(head, TTTConfig(n_neighbours=10, steps=0)).fit(x[:2500], y[:2500])
    with torch.no_grad():
        hidden = head.body(torch.from_numpy(x[:2500])).numpy()
    np.testing.assert_allclose(ttt.features_, hidden, rtol=1e-5, atol=1e-6)
    r = ttt.predict(x[2500:2550])
    assert np.array_equal(r.predictions, r.global_predictions)


def test_bf16_matmuls_mostly_agree_with_fp32(topics):
    x, y, head = topics
    q = x[2500:2700]
    fp32 = _ttt(head, x, y, n_neighbours=20, impl="exact").predict(q)
    for impl in ("exact", "fast"):
        bf16 = _ttt(head, x, y, n_neighbours=20, impl=impl, precision="bfloat16").predict(q)
        assert (bf16.predictions == fp32.predictions).mean() >= 0.97


@pytest.fixture
def fresh_choice():
    """No precision decided before the test is reused in it, and none decided in it outlives it."""
    choose_precision.cache_clear()
    yield
    choose_precision.cache_clear()


def test_auto_precision_is_float32_unless_bf16_is_native_and_measured_faster(monkeypatch, fresh_choice):
    small = choose_precision("auto", "exact", "cpu", 10, 32, 16)
    assert small["precision"] == "float32" and "too few" in small["reason"]       # decided without a timing
    assert choose_precision("bfloat16", "fast", "cpu", 10, 32, 16)["precision"] == "bfloat16"
    assert choose_precision("auto", "reference", "cpu", 60, 512, 1000)["precision"] == "float32"
    monkeypatch.setattr(local_ttt, "native_bf16", lambda device: False)
    assert "no native" in choose_precision("auto", "fast", "cpu", 60, 512, 1000)["reason"]
    monkeypatch.setattr(local_ttt, "native_bf16", lambda device: True)
    big = choose_precision("auto", "fast", "cpu", 20, 256, 1000)
    assert big["float32_ms"] > 0 and big["bfloat16_ms"] > 0
    assert (big["precision"] == "bfloat16") == (big["bfloat16_ms"] * local_ttt.BF16_GAIN < big["float32_ms"])


@pytest.mark.gpu
def test_cuda_exact_and_fast_equal_the_cpu():
    x, y, _ = sparse_topics(SparseTopics(n=1000))
    head = train_head(x[:800], y[:800], HeadConfig(epochs=5))
    for impl in ("exact", "fast"):
        cpu = LocalTTT(head, TTTConfig(n_neighbours=20, impl=impl)).fit(x[:800], y[:800]).predict(x[800:])
        gpu = LocalTTT(copy.deepcopy(head).cuda(), TTTConfig(n_neighbours=20, impl=impl), device="cuda")
        out = gpu.fit(x[:800], y[:800]).predict(x[800:])
        assert (out.predictions == cpu.predictions).mean() >= 0.995
