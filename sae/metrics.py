"""Held-out metrics of an SAE: FVU, L0, dead and dense latents, activation-frequency histogram."""

from __future__ import annotations

import numpy as np
import torch

from sae.model import TopKSAE

DENSE_FREQUENCY = 0.1
"""A latent firing on more than this fraction of inputs counts as dense."""
HIST_EDGES = np.arange(-8.0, 0.0 + 1e-9, 0.25)
"""Bin edges of the log10 activation-frequency histogram (frequencies below 1e-8 fall in the first bin)."""


def iter_batches(x, batch_size: int, device: str | torch.device = "cpu"):
    """Yield ``(start, float32 tensor)`` batches of any ``(n, d)`` array-like (numpy, memmap, tensor)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    n = int(x.shape[0])
    for start in range(0, n, batch_size):
        chunk = x[start : start + batch_size]
        if isinstance(chunk, torch.Tensor):
            xb = chunk.to(device=device, dtype=torch.float32)
        else:
            xb = torch.from_numpy(np.array(chunk, dtype=np.float32)).to(device)  # a writable copy of the rows
        yield start, xb


def code_metrics(values: np.ndarray, indices: np.ndarray, n_latents: int) -> dict:
    """L0, dead/dense latents and the frequency histogram of codes ``(n, k)`` (a latent fires when value > 0)."""
    values, indices = np.asarray(values), np.asarray(indices)
    n = values.shape[0]
    active = values > 0
    counts = np.bincount(indices[active].astype(np.int64), minlength=n_latents)
    return _summary(counts, n, float(active.sum()))


def latent_frequencies_of_counts(counts: np.ndarray, n: int) -> np.ndarray:
    return counts.astype(np.float64) / max(n, 1)


def _summary(counts: np.ndarray, n: int, n_active: float) -> dict:
    freq = latent_frequencies_of_counts(counts, n)
    n_latents = counts.shape[0]
    fired = freq > 0
    log_f = np.log10(np.clip(freq[fired], 10.0 ** HIST_EDGES[0], None))
    hist, _ = np.histogram(log_f, bins=HIST_EDGES)
    n_dense = int((freq > DENSE_FREQUENCY).sum())
    return {
        "n": int(n),
        "l0": n_active / max(n, 1),
        "n_dead": int((~fired).sum()),
        "dead_fraction": float((~fired).mean()) if n_latents else 0.0,
        "n_dense": n_dense,
        "dense_fraction": n_dense / n_latents if n_latents else 0.0,
        "freq_hist": {"log10_edges": HIST_EDGES.tolist(), "counts": hist.tolist(), "n_never_fired": int((~fired).sum())},
    }


@torch.no_grad()
def evaluate(
    model: TopKSAE,
    x_heldout,
    batch_size: int = 4096,
    device: str | torch.device | None = None,
    return_frequencies: bool = False,
):
    """Metrics of ``model`` on held-out ``x (n, d)``, in batches and without gradients.

    Returns a JSON-able dict: ``fvu`` (over the whole set: sum of squared errors over the total sum of
    squares about the set's mean), ``mse``, ``l0`` (mean number of latents with value > 0), ``dead_fraction``
    (never fired on this set), ``n_dense``/``dense_fraction`` (firing on > 10% of inputs), ``freq_hist``.
    With ``return_frequencies`` also the per-latent firing frequencies ``(n_latents,)``.
    """
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n_latents = model.config.n_latents
    counts = np.zeros(n_latents, dtype=np.int64)
    sse = 0.0
    sum_x = torch.zeros(model.config.d_in, dtype=torch.float64, device=device)
    sum_sq = 0.0
    n_active = 0.0
    n = 0
    try:
        for _, xb in iter_batches(x_heldout, batch_size, device):
            values, indices = model.encode(xb)
            recon = model.decode(values, indices)
            sse += float((xb - recon).double().pow(2).sum())
            sum_x += xb.double().sum(0)
            sum_sq += float(xb.double().pow(2).sum())
            active = values > 0
            n_active += float(active.sum())
            counts += np.bincount(indices[active].cpu().numpy(), minlength=n_latents)
            n += xb.shape[0]
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("cannot evaluate an SAE on an empty array")
    total_ss = sum_sq - float((sum_x * sum_x).sum()) / n
    result = {"fvu": sse / max(total_ss, 1e-30), "mse": sse / (n * model.config.d_in)}
    result.update(_summary(counts, n, n_active))
    if return_frequencies:
        return result, latent_frequencies_of_counts(counts, n)
    return result
