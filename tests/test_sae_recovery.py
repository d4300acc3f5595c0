"""Planted ground truth: an SAE trained on data made from a known sparse dictionary recovers its atoms."""

from __future__ import annotations

import numpy as np
import torch

from sae.checkpoint import load_sae
from sae.config import SAEConfig
from sae.train import RunConfig, TrainConfig, train_sae


def sparse_dictionary_data(n: int, d: int, n_atoms: int, n_active: int, noise: float, seed: int):
    """Rows ``x = c @ atoms + noise`` with unit-norm random atoms and ``n_active`` non-negative codes per row."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    codes = np.zeros((n, n_atoms))
    for i in range(n):
        codes[i, rng.choice(n_atoms, n_active, replace=False)] = rng.uniform(0.5, 1.5, n_active)
    x = codes @ atoms + noise * rng.normal(size=(n, d))
    return x.astype(np.float32), atoms


def test_sae_recovers_the_planted_dictionary(tmp_path):
    d, n_atoms, n_active = 32, 64, 3
    x, atoms = sparse_dictionary_data(8000, d, n_atoms, n_active, noise=0.01, seed=0)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is faster than two contending ones
    try:
        result = train_sae(
            x, tmp_path / "sae", SAEConfig(d_in=d, n_latents=2 * n_atoms, k=n_active),
            TrainConfig(n_steps=1000, batch_size=256, lr=3e-3, seed=0),
            RunConfig(progress=False, checkpoint_every=0, log_every=100),
            train_rows=np.arange(500, 8000), heldout_rows=np.arange(500),
        )
    finally:
        torch.set_num_threads(n_threads)
    model = load_sae(tmp_path / "sae")
    decoder = torch.nn.functional.normalize(model.W_dec.detach(), dim=1).numpy()
    best = (atoms @ decoder.T).max(axis=1)  # for each atom, its closest decoder row (cosine)
    assert (best >= 0.9).mean() >= 0.9, np.sort(best)[:10]
    assert result.metrics["heldout"]["fvu"] < 0.2
    # Control: random unit rows recover nothing, so the bar is not met by chance.
    rand = np.random.default_rng(1).normal(size=decoder.shape)
    rand /= np.linalg.norm(rand, axis=1, keepdims=True)
    assert ((atoms @ rand.T).max(axis=1) >= 0.9).mean() == 0.0
