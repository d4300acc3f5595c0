"""Sparse autograd functions of the top-k SAE: gathered pre-activations and sparse decoding.

After top-k only ``b * m`` pre-activations (m = k, plus the AuxK latents) receive a gradient, so the
encoder's backward costs ``b * m * d`` instead of the dense ``b * n_latents * d`` matmul, and the decoder
never builds the dense ``(b, n_latents)`` code. ``sae/reference.py`` is the dense twin these are tested against.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

# CSR sparse-dense products are stable for this use; the beta notice would repeat on every backward.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def _sparse_rows_t_matmul(indices: Tensor, weights: Tensor, rows: Tensor, n_out: int) -> Tensor:
    """``out[j] = sum over (b, i) with indices[b, i] == j of weights[b, i] * rows[b]``, shape ``(n_out, d)``.

    This is ``S^T @ rows`` for the sparse ``(b, n_out)`` matrix ``S`` with ``k`` weighted entries per row,
    done as one sparse-dense product (CSR on CPU) rather than a dense matmul.
    """
    b, m = indices.shape
    d = rows.shape[1]
    if b == 0 or m == 0:
        return rows.new_zeros(n_out, d)
    # Entry (j, b) of S^T. Sorting by latent gives CSR directly.
    flat_idx = indices.reshape(-1)
    order = torch.argsort(flat_idx, stable=True)
    col = torch.arange(b, device=rows.device).repeat_interleave(m)[order]
    crow = torch.zeros(n_out + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(flat_idx, minlength=n_out), 0)
    st = torch.sparse_csr_tensor(
        crow, col, weights.reshape(-1)[order].to(rows.dtype), size=(n_out, b), check_invariants=False
    )
    return torch.sparse.mm(st, rows) if rows.device.type != "cpu" else st @ rows


class GatherPre(torch.autograd.Function):
    """Selected pre-activations ``pre[b, idx[b, i]]`` of ``pre = (x - b_dec) @ W_enc + b_enc``, sparse backward.

    The forward takes the already-gathered values (the dense ``pre`` is computed once, without autograd,
    to choose the indices); the backward is the exact gradient of the gather with respect to
    ``x``, ``W_enc``, ``b_enc`` and ``b_dec`` touching only the selected columns.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, indices: Tensor, gathered: Tensor):
        ctx.save_for_backward(x, W_enc, b_dec if b_dec is not None else torch.empty(0), indices)
        ctx.has_b_dec = b_dec is not None
        ctx.mark_non_differentiable(indices)
        return gathered.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, W_enc, b_dec, indices = ctx.saved_tensors
        n_latents = W_enc.shape[1]
        g = grad.to(W_enc.dtype)
        flat_idx = indices.reshape(-1)
        need_x, need_w, need_be, need_bd = ctx.needs_input_grad[:4]
        grad_x = grad_w = grad_be = grad_bd = None
        # s[j] = sum of the gradients reaching latent j: the b_enc gradient, and -W_enc @ s is b_dec's.
        s = None
        if need_be or need_bd:
            s = torch.zeros(n_latents, dtype=W_enc.dtype, device=W_enc.device).index_add_(0, flat_idx, g.reshape(-1))
        if need_be:
            grad_be = s
        if need_w:
            x_in = x.to(W_enc.dtype)
            if ctx.has_b_dec:
                x_in = x_in - b_dec
            grad_w = _sparse_rows_t_matmul(indices, g, x_in, n_latents).t()
        if need_x:
            W_t = W_enc.t().contiguous()
            grad_x = F.embedding_bag(indices, W_t, per_sample_weights=g, mode="sum").to(x.dtype)
        if ctx.has_b_dec and need_bd:
            grad_bd = -(W_enc @ s)
        return grad_x, grad_w, grad_be, grad_bd, None, None


def gather_pre(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, indices: Tensor, gathered: Tensor
) -> Tensor:
    """Differentiable ``pre.gather(1, indices)`` given the gathered values; ``(b, m)``."""
    return GatherPre.apply(x, W_enc, b_enc, b_dec, indices, gathered)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """Sparse decode (no bias): ``out[b] = sum_i values[b, i] * W_dec[indices[b, i]]``; ``(b, k) -> (b, d)``.

    ``embedding_bag`` with per-sample weights is already a sparse kernel in both directions: its backward
    accumulates ``values * grad`` into the touched decoder rows and computes the value gradients as row dot
    products without building ``W_dec[indices]`` (a ``(b, k, d)`` gather that measured 10x slower on CPU).
    """
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")
