"""Global heads: training recipe, early stopping, sparse inputs, save/load."""

import numpy as np
import pytest
import torch

from analysis.heads import HeadConfig, head_features, load_head, predict_head, save_head, train_head
from analysis.neighbours import SparseCodes
from analysis.ttt.data import isotropic
from artifacts import ArtifactError, read_json


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _data(n=600):
    return isotropic(n=n, dim=12, n_classes=4, noise=0.1, seed=1)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_head_learns_and_is_seeded(kind):
    x, y = _data()
    cfg = HeadConfig(kind=kind, hidden=16, epochs=20, batch_size=50, lr=1e-2)
    a = train_head(x[:500], y[:500], cfg)
    b = train_head(x[:500], y[:500], cfg)
    acc = (predict_head(a, x[500:]) == y[500:]).mean()
    assert acc > 0.7
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    c = train_head(x[:500], y[:500], HeadConfig(kind=kind, hidden=16, epochs=20, batch_size=50, lr=1e-2, seed=1))
    assert not torch.equal(a.last.weight, c.last.weight)


def test_regression_head_fits_a_linear_target():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5)).astype(np.float32)
    t = x @ np.arange(1, 6, dtype=np.float32)
    head = train_head(x, t, HeadConfig(task="regression", epochs=60, batch_size=40, lr=3e-2))
    pred = predict_head(head, x)
    assert pred.shape == (400,)
    assert np.mean((pred - t) ** 2) < 0.05 * t.var()


def test_sparse_codes_train_the_same_head_as_their_dense_copy():
    rng = np.random.default_rng(0)
    n, k, n_latents = 300, 3, 40
    indices = np.stack([rng.choice(n_latents, k, replace=False) for _ in range(n)])
    values = np.sort(rng.uniform(0.1, 1.0, (n, k)).astype(np.float32), axis=1)[:, ::-1].copy()
    codes = SparseCodes(values, indices, n_latents)
    y = indices[:, 0] % 3
    cfg = HeadConfig(epochs=3, batch_size=32)
    sparse_head = train_head(codes, y, cfg)
    dense_head = train_head(codes.dense(), y, cfg)
    assert torch.allclose(sparse_head.last.weight, dense_head.last.weight, atol=1e-6)
    assert head_features(sparse_head, codes) is codes  # a linear head reads the codes as they are


def test_early_stopping_restores_the_best_epoch():
    x, y = _data()
    cfg = HeadConfig(epochs=200, patience=2, lr=5e-2, batch_size=50)
    head = train_head(x[:300], y[:300], cfg, x_val=x[300:], y_val=y[300:])
    assert (predict_head(head, x[300:]) == y[300:]).mean() > 0.6
    with pytest.raises(ValueError, match="--patience"):
        train_head(x, y, cfg)


def test_save_load_round_trip(tmp_path):
    x, y = _data()
    head = train_head(x, y, HeadConfig(kind="mlp", hidden=8, epochs=2))
    out = save_head(head, tmp_path / "head", parents={"store": "abc"})
    back = load_head(out)
    assert back.config == head.config
    assert np.array_equal(predict_head(back, x), predict_head(head, x))
    assert read_json(out / "meta.json")["parents"] == {"store": "abc"}
    with pytest.raises(ArtifactError):
        save_head(head, out)
    with pytest.raises(ArtifactError, match="no head"):
        load_head(tmp_path / "missing")


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--head"):
        HeadConfig(kind="tree")
    with pytest.raises(ValueError, match="--patience"):
        HeadConfig(patience=0)
