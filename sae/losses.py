"""Loss terms of the top-k SAE: small pure functions of tensors.

Every term is a mean of per-sample terms divided by a normaliser that does not depend on the batch when
``x_var`` is given; data-parallel training on shards then equals one process on the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _acc(t: Tensor) -> Tensor:
    """Losses accumulate in float32 at least (bf16/fp16 inputs are upcast; float64 stays float64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def total_variance(x: Tensor) -> Tensor:
    """Sum over dimensions of the (biased) variance of ``x (b, d)``: ``mean_b ||x_b - mean(x)||^2``."""
    x = _acc(x)
    return (x - x.mean(0, keepdim=True)).pow(2).sum(1).mean()


def _normaliser(x: Tensor, x_var: float | Tensor | None) -> Tensor:
    if x_var is None:
        v = total_variance(x)
    else:
        v = torch.as_tensor(x_var, dtype=_acc(x).dtype, device=x.device)
    # A batch of identical rows has no variance; keep the loss finite rather than dividing by zero.
    return v.clamp_min(1e-12)


def fvu(x: Tensor, recon: Tensor, x_var: float | Tensor | None = None) -> Tensor:
    """Fraction of variance unexplained: ``sum_b ||x_b - recon_b||^2 / (b * x_var)``.

    ``x_var`` is the data's total variance (sum over dims); ``None`` uses the batch's own, which gives
    the usual ``||x - recon||^2 / ||x - mean(x)||^2`` (Gao et al. 2024 report this normalised MSE).
    """
    # One fused kernel each way (sum of squares) rather than sub, pow, sum and mean on (b, d).
    err = F.mse_loss(_acc(recon), _acc(x), reduction="sum")
    return err / (x.shape[0] * _normaliser(x, x_var))


def mse(x: Tensor, recon: Tensor) -> Tensor:
    """Mean squared error over all elements (``F.mse_loss``), the authors' reconstruction term."""
    return F.mse_loss(_acc(recon), _acc(x))


def auxk_loss(residual: Tensor, residual_hat: Tensor, x: Tensor, x_var: float | Tensor | None, scale: float) -> Tensor:
    """AuxK loss (Gao et al. 2024, Sec. A.2): the dead latents' top-k_aux reconstruct the residual.

    ``residual = x - recon`` (no gradient), ``residual_hat`` its reconstruction from the dead latents (no
    bias). Normalised by the data variance like the FVU, and scaled by ``min(n_dead / k_aux, 1)`` so that a
    handful of dead latents does not receive the whole weight; both choices follow EleutherAI sparsify
    (sparsify/sparse_coder.py), which keeps the auxiliary term on the FVU's scale.
    """
    err = F.mse_loss(_acc(residual_hat), _acc(residual), reduction="sum")
    return scale * err / (x.shape[0] * _normaliser(x, x_var))


def ghost_loss(ghost_recon: Tensor, residual: Tensor) -> Tensor:
    """The authors' ghost-gradient loss: MSE between the dead latents' reconstruction and the residual.

    As in github.com/patrikwolf/ttt_theory sae/sae_topk.py: ``ghost_recon`` decodes the (dropped-out)
    pre-activations of all dead latents, without top-k, through the normalised decoder *plus* the decoder
    bias; the residual carries no gradient. The weight (1e6 in their config.json) is applied by the caller.
    """
    return F.mse_loss(_acc(ghost_recon), _acc(residual))
