"""SAE metrics: hand-made codes, and evaluate() against a direct computation."""

import numpy as np
import pytest
import torch

from sae.config import SAEConfig
from sae.metrics import code_metrics, evaluate
from sae.model import TopKSAE


def test_code_metrics_on_hand_made_codes():
    # 4 rows, k = 2, 5 latents. Latent 0 fires in every row; latent 4 never; latent 3 only with value 0.
    indices = np.array([[0, 1], [0, 2], [0, 3], [0, 1]])
    values = np.array([[2.0, 1.0], [3.0, 0.5], [1.0, 0.0], [1.0, 0.2]], dtype=np.float32)
    m = code_metrics(values, indices, 5)
    assert m["n"] == 4
    assert m["l0"] == pytest.approx(7 / 4)
    assert m["n_dead"] == 2 and m["dead_fraction"] == pytest.approx(0.4)  # latents 3 and 4
    # Frequencies: 1.0, 0.5, 0.25 -> all above 10%.
    assert m["n_dense"] == 3 and m["dense_fraction"] == pytest.approx(0.6)
    hist = m["freq_hist"]
    assert sum(hist["counts"]) == 3 and hist["n_never_fired"] == 2
    edges = np.array(hist["log10_edges"])
    for f in (1.0, 0.5, 0.25):
        b = min(np.searchsorted(edges, np.log10(f), side="right") - 1, len(hist["counts"]) - 1)
        assert hist["counts"][b] >= 1


def test_evaluate_matches_direct_computation():
    torch.manual_seed(0)
    model = TopKSAE(SAEConfig(6, 30, 4))
    x = torch.randn(101, 6) * torch.tensor([1.0, 2, 3, 1, 1, 0.5]) + 1.0
    m, freq = evaluate(model, x.numpy(), batch_size=17, return_frequencies=True)
    values, indices = model.encode(x)
    recon = model.decode(values, indices)
    fvu = ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert m["fvu"] == pytest.approx(fvu.item(), rel=1e-4)
    assert m["l0"] == pytest.approx((values > 0).sum().item() / 101)
    direct = np.bincount(indices[values > 0].numpy(), minlength=30) / 101
    np.testing.assert_allclose(freq, direct)
    assert m["dead_fraction"] == pytest.approx((direct == 0).mean())
    assert m["n_dense"] == int((direct > 0.1).sum())
    assert model.training  # evaluate restores the mode


def test_evaluate_rejects_empty():
    with pytest.raises(ValueError, match="empty"):
        evaluate(TopKSAE(SAEConfig(3, 6, 2)), np.zeros((0, 3), dtype=np.float32))
