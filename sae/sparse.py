"""Sparse autograd functions of the top-k SAE: gathered pre-activations, dead-column pre-activations and
sparse decoding.

After top-k only ``b * k`` pre-activations receive a gradient, so the encoder's backward costs ``b * k * d``
(one CSR sparse-dense product) instead of the dense ``b * n_latents * d`` matmul, and the decoder never builds
the dense ``(b, n_latents)`` code. The auxiliary losses touch only the dead latents' columns, whose backward
is dense on those columns. ``sae/reference.py`` is the dense twin these are tested against.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """A CSR tensor built without checking its invariants (the callers build them correct)."""
    with warnings.catch_warnings():
        # CSR products are stable for this use; the "beta" notice would otherwise repeat on every step.
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


class SparsePattern:
    """The sparsity pattern of ``indices (b, m)`` in a ``(b, n)`` matrix, with the CSR structures it needs.

    The transposed ``(n, b)`` CSR structure (for ``S^T @ dense``) is built once per step and shared by the
    encoder's and the decoder's backward. On CPU the sort runs in numpy: torch's multi-threaded sort of
    these small index arrays measured 10-100x slower on 2 shared cores.
    """

    def __init__(self, indices: Tensor, n: int):
        self.indices = indices
        self.n = n
        self.b, self.m = indices.shape
        self._cols = None

    def col_structure(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(crow (n+1,), col (b*m,), order (b*m,))``: ``values.reshape(-1)[order]`` is in CSR order."""
        if self._cols is None:
            b, m, n = self.b, self.m, self.n
            flat = self.indices.reshape(-1)
            if flat.device.type == "cpu":
                lat = flat.numpy()
                # numpy's stable sort is a radix sort for 16-bit keys and a merge sort for wider ones:
                # 0.4-0.8 ms against 5-7 ms measured for 65536 keys (b=4096, k=16).
                key_dtype = np.uint16 if n <= 2**16 else np.int32 if n < 2**31 else lat.dtype
                order_np = np.argsort(lat.astype(key_dtype), kind="stable")
                order = torch.from_numpy(order_np)
                col = torch.from_numpy(order_np // m)
                crow = torch.from_numpy(np.searchsorted(lat[order_np], np.arange(n + 1)))
            else:
                key = flat * b + torch.arange(b, device=flat.device).repeat_interleave(m)
                key, order = torch.sort(key)  # unique keys: rows ascending within each latent
                latent = torch.div(key, b, rounding_mode="floor")
                col = key - latent * b
                crow = torch.searchsorted(latent, torch.arange(n + 1, device=flat.device))
            self._cols = (crow.long(), col.long(), order)
        return self._cols

    def t_matmul(self, weights: Tensor, dense: Tensor) -> Tensor:
        """``S^T @ dense``, shape ``(n, d)``, for ``S (b, n)`` holding ``weights (b, m)`` at the pattern."""
        crow, col, order = self.col_structure()
        st = csr(crow, col, weights.reshape(-1)[order].to(dense.dtype), (self.n, self.b))
        return st @ dense if dense.device.type == "cpu" else torch.sparse.mm(st, dense)

    def sampled_rows_dot(self, left: Tensor, right: Tensor) -> Tensor:
        """``out[b, i] = left[b] . right[indices[b, i]]`` for ``left (b, d)``, ``right (n, d)``; ``(b, m)``."""
        if left.device.type != "cpu":
            return torch.bmm(right[self.indices], left.unsqueeze(2)).squeeze(2)
        # A sampled dense-dense product on the (b, n) pattern (m entries per row, in the code's order, which
        # the CPU kernel accepts unsorted), without gathering the (b, m, d) rows: 10x faster measured.
        crow = torch.arange(0, self.b * self.m + 1, self.m)
        pattern = csr(crow, self.indices.reshape(-1), left.new_zeros(self.b * self.m), (self.b, self.n))
        return torch.sparse.sampled_addmm(pattern, left, right.t(), beta=0.0).values().reshape(self.b, self.m)


class GatherPre(torch.autograd.Function):
    """Selected pre-activations ``pre[b, idx[b, i]]`` of ``pre = (x - b_dec) @ W_enc + b_enc``, sparse backward.

    The forward takes the already-gathered values (the dense ``pre`` is computed once, without autograd,
    to choose the indices); the backward is the exact gradient of the gather with respect to
    ``x``, ``W_enc``, ``b_enc`` and ``b_dec`` touching only the selected columns.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        b_dec: Tensor | None,
        pattern: SparsePattern,
        gathered: Tensor,
        x_in: Tensor | None,
    ):
        # x_in = x - b_dec when the caller already has it (saves recomputing it in the backward).
        if x_in is None:
            x_in = x if b_dec is None else x - b_dec
        ctx.save_for_backward(x_in, W_enc)
        ctx.has_b_dec = b_dec is not None
        ctx.pattern = pattern
        # Returned as it is (autograd makes it a view with this function as its gradient): no copy.
        return gathered

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_in, W_enc = ctx.saved_tensors
        pattern = ctx.pattern
        indices = pattern.indices
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
            grad_w = pattern.t_matmul(g, x_in.to(W_enc.dtype)).t()
        if need_x:
            W_t = W_enc.t().contiguous()
            grad_x = F.embedding_bag(indices, W_t, per_sample_weights=g, mode="sum").to(x_in.dtype)
        if ctx.has_b_dec and need_bd:
            grad_bd = -(W_enc @ s)
        return grad_x, grad_w, grad_be, grad_bd, None, None, None


def gather_pre(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    indices: Tensor | SparsePattern,
    gathered: Tensor,
    x_in: Tensor | None = None,
) -> Tensor:
    """Differentiable ``pre.gather(1, indices)`` given the gathered values; ``(b, m)``.

    ``pre = (x - b_dec) @ W_enc + b_enc`` (no ``- b_dec`` when ``b_dec`` is None); ``x_in``, if given, is
    ``x - b_dec`` computed without autograd.
    """
    pattern = indices if isinstance(indices, SparsePattern) else SparsePattern(indices, W_enc.shape[1])
    return GatherPre.apply(x, W_enc, b_enc, b_dec, pattern, gathered, None if x_in is None else x_in.detach())


class ColumnPre(torch.autograd.Function):
    """Pre-activations of a set of latent columns ``pre[:, cols]`` (``(b, c)``), dense backward on those columns.

    The auxiliary losses use every dead latent's pre-activation; the forward takes the values already gathered
    from the dense pre-activations and the backward costs one ``d x b x c`` matmul (plus one for ``x`` only
    when it needs a gradient), instead of recomputing the columns and differentiating through the indexing.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, cols: Tensor, gathered: Tensor, x_in: Tensor | None):
        if x_in is None:
            x_in = x if b_dec is None else x - b_dec
        ctx.save_for_backward(x_in, W_enc, cols)
        ctx.has_b_dec = b_dec is not None
        return gathered  # as GatherPre: no copy

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_in, W_enc, cols = ctx.saved_tensors
        # The matmuls run in the forward values' dtype when that is narrower (bfloat16 after the bf16 filter).
        dtype = grad.dtype if grad.element_size() < W_enc.element_size() else W_enc.dtype
        g = grad.to(dtype)
        need_x, need_w, need_be, need_bd = ctx.needs_input_grad[:4]
        grad_x = grad_w = grad_be = grad_bd = None
        s = g.to(W_enc.dtype).sum(0) if (need_be or need_bd) else None
        if need_w:
            # Built as the transpose of an (n, d) matrix, the layout GatherPre's gradient has, so that
            # autograd sums the two without a strided add (measured 30x slower than a contiguous one).
            grad_w_t = W_enc.new_zeros(W_enc.shape[1], W_enc.shape[0])
            cols_grad = (x_in.to(dtype).t() @ g).t()  # this matmul order is 2x faster
            grad_w_t.index_copy_(0, cols, cols_grad.to(W_enc.dtype))
            grad_w = grad_w_t.t()
        if need_be:
            grad_be = W_enc.new_zeros(W_enc.shape[1])
            grad_be[cols] = s
        W_cols = W_enc[:, cols] if (need_x or need_bd) else None
        if need_x:
            grad_x = (g @ W_cols.t().to(dtype)).to(x_in.dtype)
        if ctx.has_b_dec and need_bd:
            grad_bd = -(W_cols @ s)
        return grad_x, grad_w, grad_be, grad_bd, None, None, None


def column_pre(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    cols: Tensor,
    gathered: Tensor,
    x_in: Tensor | None = None,
) -> Tensor:
    """Differentiable ``pre[:, cols]`` given its values; ``pre = (x - b_dec) @ W_enc + b_enc``; ``(b, c)``."""
    return ColumnPre.apply(x, W_enc, b_enc, b_dec, cols, gathered, None if x_in is None else x_in.detach())


class SparseDecode(torch.autograd.Function):
    """``out[b] = sum_i values[b, i] * W_dec[indices[b, i]]``, shape ``(b, d)``, without the dense code."""

    @staticmethod
    def forward(ctx, values: Tensor, W_dec: Tensor, pattern: SparsePattern):
        v = values.to(W_dec.dtype)
        ctx.save_for_backward(v, W_dec)
        ctx.pattern = pattern
        ctx.values_dtype = values.dtype
        return F.embedding_bag(pattern.indices, W_dec, per_sample_weights=v, mode="sum")

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        v, W_dec = ctx.saved_tensors
        g = grad_out.to(W_dec.dtype).contiguous()
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            # d out[b] / d values[b, i] = W_dec[indices[b, i]]: a dot product per selected entry.
            grad_values = ctx.pattern.sampled_rows_dot(g, W_dec).to(ctx.values_dtype)
        if ctx.needs_input_grad[1]:
            # Row j of the gradient sums values[b, i] * grad[b] over the entries selecting latent j.
            grad_w = ctx.pattern.t_matmul(v, g)
        return grad_values, grad_w, None


def sparse_decode(values: Tensor, indices: Tensor | SparsePattern, W_dec: Tensor) -> Tensor:
    """Sparse decode (no bias): ``out[b] = sum_i values[b, i] * W_dec[indices[b, i]]``; ``(b, k) -> (b, d)``.

    Pass a ``SparsePattern`` to share its sorted structures with ``gather_pre`` on the same indices.
    """
    pattern = indices if isinstance(indices, SparsePattern) else SparsePattern(indices, W_dec.shape[0])
    return SparseDecode.apply(values, W_dec, pattern)
