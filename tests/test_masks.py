"""Concept masks (O2) and the O3 measures: union problems, masked TTT, agreement, update concentration."""

import numpy as np
import pytest
import torch

from analysis.heads import HeadConfig, train_head
from analysis.ttt.masks import MaskConfig, agreement, masked_ttt, union_problems, update_concentration
from analysis.local_ttt import LocalTTT, TTTConfig, top_distribution
from analysis.ttt.data import SparseTopics, sparse_topics


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def coded():
    _, y, codes = sparse_topics(SparseTopics(n=1200, n_concepts=64, n_topics=20))
    head = train_head(codes.take(np.arange(1000)), y[:1000], HeadConfig(epochs=20, batch_size=100, lr=1e-2))
    train = codes.take(np.arange(1000))
    ttt = LocalTTT(head, TTTConfig(n_neighbours=20, metric="cosine", steps=30)).fit(train, y[:1000])
    queries = codes.take(np.arange(1000, 1100))
    return head, train, y, queries, ttt.neighbours(queries)


def test_union_problems_hold_the_dense_codes(coded):
    _, train, _, queries, nb = coded
    prob = union_problems(train, nb, queries)
    dense = train.dense()
    for i in range(5):
        cols = prob.latents[i][prob.valid[i] > 0].numpy()
        assert np.array_equal(np.unique(cols), cols)
        np.testing.assert_allclose(prob.Z[i][:, prob.valid[i] > 0].numpy(), dense[nb[i]][:, cols], rtol=1e-6)
        outside = np.setdiff1d(np.arange(train.n_latents), cols)
        assert not dense[nb[i]][:, outside].any()
        assert set(queries.indices[i].tolist()) <= set(cols.tolist())


def test_no_mask_is_plain_ttt_on_the_codes(coded):
    head, train, y, queries, nb = coded
    prob = union_problems(train, nb, queries)
    out = masked_ttt(head.last, prob, torch.from_numpy(y[nb]), MaskConfig(kind="none", steps=30, lr=1e-2))
    ttt = LocalTTT(head, TTTConfig(n_neighbours=20, metric="cosine", steps=30)).fit(train, y[:1000])
    plain = ttt.predict(queries, neighbours=nb)
    assert (out["logits"].argmax(1).numpy() == plain.predictions).mean() >= 0.99
    assert torch.equal(out["kept"], out["n_union"])


def test_learned_mask_keeps_fewer_concepts_as_lambda_grows(coded):
    head, train, y, queries, nb = coded
    prob = union_problems(train, nb, queries)
    target = torch.from_numpy(y[nb])
    kept = [masked_ttt(head.last, prob, target, MaskConfig(lam=lam))["kept"].mean().item() for lam in (0.0, 0.2, 2.0)]
    assert kept[0] > kept[1] > kept[2]


def test_query_mask_keeps_the_query_concepts(coded):
    head, train, y, queries, nb = coded
    out = masked_ttt(head.last, union_problems(train, nb, queries), torch.from_numpy(y[nb]), MaskConfig(kind="query"))
    n_own = [len(set(row.tolist())) for row in queries.indices]
    assert out["kept"].tolist() == n_own


def test_agreement_of_a_run_with_itself_and_with_another():
    logits = np.random.default_rng(0).normal(size=(50, 30)).astype(np.float32)
    top = top_distribution(logits)
    same = agreement(logits.argmax(1), logits.argmax(1), top, top, "self")
    assert same["rate"]["value"] == 1.0 and same["top10_shared_mass"]["value"] == pytest.approx(1.0, abs=1e-5)
    other = top_distribution(-logits)
    diff = agreement(logits.argmax(1), (-logits).argmax(1), top, other, "opposite")
    assert diff["rate"]["value"] == 0.0 and diff["top10_shared_mass"]["value"] < 0.2


def test_update_concentration_finds_the_atoms_the_update_lies_on():
    rng = np.random.default_rng(0)
    decoder = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(64, 16)).astype(np.float32)), dim=1)
    active = [np.array([1, 5, 9]), np.array([2, 3, 40])]
    delta = torch.stack([torch.from_numpy(rng.normal(size=(4, 1)).astype(np.float32)) * decoder[ids].sum(0) for ids in active])
    out = update_concentration(delta, decoder, active, seed=0)
    assert out["active"]["value"] > out["random"]["value"]
    assert out["active"]["n"] == 2


def test_update_concentration_leaves_out_updates_that_did_not_move():
    """A zero update (--steps 0 or --lr 0) has no direction: it is left out, never a 0/0 share."""
    rng = np.random.default_rng(0)
    decoder = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(64, 16)).astype(np.float32)), dim=1)
    active = [np.array([1, 5, 9]), np.array([2, 3, 40]), np.array([7, 8])]
    delta = torch.stack([torch.from_numpy(rng.normal(size=(4, 1)).astype(np.float32)) * decoder[ids].sum(0)
                         for ids in active])
    delta[1] = 0.0
    out = update_concentration(delta, decoder, active, seed=0)
    assert out["active"]["n"] == 2 and 0 < out["active"]["value"] <= 1
    none_moved = update_concentration(torch.zeros_like(delta), decoder, active, seed=0)
    assert none_moved["active"] is None and none_moved["difference"] is None and "zero" in none_moved["note"]
