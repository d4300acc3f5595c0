"""NeighbourIndex: exact search equals brute force in dense and code space; exclusion; split restriction."""

import numpy as np
import pytest

from analysis.neighbours import NeighbourIndex, SparseCodes


def _brute_cosine(q, x):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    return qn @ xn.T


def test_dense_cosine_equals_brute_force_with_split_and_exclusion():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 12)).astype(np.float32)
    train = np.arange(0, 400, 2)
    scores, rows = NeighbourIndex().fit(x, rows=train).search(x[:20], 7, exclude=np.arange(20))
    sims = _brute_cosine(x[:20], x[train])
    sims[np.arange(20) % 2 == 0, np.arange(20)[np.arange(20) % 2 == 0] // 2] = -np.inf
    np.testing.assert_allclose(scores, -np.sort(-sims, axis=1)[:, :7], atol=1e-5)
    assert np.isin(rows, train).all()
    assert not (rows == np.arange(20)[:, None]).any()


def test_code_space_equals_brute_force_on_dense_codes():
    rng = np.random.default_rng(1)
    n, n_latents, k = 300, 48, 4
    indices = np.stack([rng.choice(n_latents, k, replace=False) for _ in range(n)])
    values = -np.sort(-rng.random((n, k)).astype(np.float32), axis=1)
    codes = SparseCodes(values, indices, n_latents)
    scores, rows = NeighbourIndex().fit(codes).search(codes.take(np.arange(30)), 10, exclude=np.arange(30))
    sims = _brute_cosine(codes.dense()[:30], codes.dense())
    sims[np.arange(30), np.arange(30)] = -np.inf
    np.testing.assert_allclose(scores, -np.sort(-sims, axis=1)[:, :10], atol=1e-5)
    # Ties tolerated: every returned row has the brute-force score it claims.
    np.testing.assert_allclose(np.take_along_axis(sims, rows, 1), scores, atol=1e-5)


def test_search_refuses_to_run_unfitted():
    with pytest.raises(RuntimeError, match="not fitted"):
        NeighbourIndex().search(np.zeros((1, 3), np.float32), 1)
