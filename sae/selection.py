"""Choosing each row's top-k latents: the encoder pre-activations and their top-k, without autograd.

Two ways to the same latents (``TopKSAE.precision``):

- ``fp32``: the encoder matmul in the parameters' dtype, then top-k (``select_plain``).
- ``bf16``: a bfloat16 matmul as a filter, then exact float32 pre-activations for the few entries that a proven
  bound on the filter's error (``filter_error_bound``) leaves in reach of the top-k, and their top-k
  (``select_filtered``). The chosen latents and their values are those of the float32 computation (up to its
  own rounding, and ties). Where bf16 matmuls are native (``avx512_bf16``, AMX, GPUs) the filter costs a
  fraction of the float32 matmul; ``sae/precision.py`` measures which way is faster.

On CPU both work in cache-sized row blocks (each block's pre-activations are still in cache when top-k reads
them, and the dense ``(b, n)`` pre-activations are never held whole), through oneDNN's matmul and the numba
kernels of ``sae/selection_kernels.py``. Elsewhere (CUDA, float64, autocast) torch operations do the same
work: a two-stage top-k, and for the filter each row's best ``CANDIDATES * k`` entries, a certificate per row,
and float32 recomputation of the rows without one.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

from sae import selection_kernels as kernels
from sae.sparse import csr

PRECISIONS = ("fp32", "bf16")

KERNELS = True
"""Use the numba kernels on CPU (``sae/selection_kernels.py``); the tests switch them off to test the torch path."""

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
"""Run the float32 encoder matmul through oneDNN on CPU (where this torch build has it)."""

CPU_BLOCK_ROWS = 1024
"""Rows per block of the CPU encoder matmul + top-k: large enough to keep the number of parallel regions low."""

TOPK_GROUP = 16
"""Columns per group of the CPU two-stage top-k (``topk_indices``); 16 measured best for n=4096, k=16."""

CANDIDATES = 4
"""The torch way of the bf16 filter keeps ``CANDIDATES * k`` entries per row for exact re-ranking. At
initialisation (unit rows, unit encoder columns) the error bound spans about a quarter of a pre-activation's
standard deviation, which puts about 2k entries within reach of the top-k for k=16, n=4096 (the CPU kernel
computes 37-39 exact values per row there); 4k leaves the certificate failing on a negligible fraction of rows."""

BF16_UNIT_ROUNDOFF = 2.0**-8
FP32_UNIT_ROUNDOFF = 2.0**-24


def two_stage_topk(pre: Tensor, k: int, sorted: bool = True) -> tuple[Tensor, Tensor]:
    """``torch.topk(pre, k, dim=1)`` of ``pre (b, n)``, in two cheaper stages on CPU; ``(values, indices)``.

    Column ``c`` belongs to group ``c mod G`` (``G = n / TOPK_GROUP``). Every one of the k largest entries lies
    in one of the k groups with the largest maxima (a group whose maximum ranks below k has k larger entries
    elsewhere), so top-k over the ``G`` group maxima, then top-k over those groups' ``k * TOPK_GROUP``
    columns, gives the same values as one top-k over all ``n`` columns (indices may differ only among ties,
    which ``torch.topk`` leaves unspecified too). The strided grouping makes the group maximum a reduction
    along contiguous rows, which vectorises; torch's CPU top-k costs per element, and this reads each
    element once instead: 4.7 ms against 7.5-9 ms per (1024, 4096) block with k=16, measured.
    """
    b, n = pre.shape
    s = TOPK_GROUP
    if pre.device.type != "cpu" or n % s or 4 * k * s > n:
        return torch.topk(pre, k, dim=1, sorted=sorted)
    g = n // s
    _, groups = torch.topk(pre.reshape(b, s, g).amax(1), k, dim=1, sorted=False)  # (b, k) of the g groups
    cand = (groups.unsqueeze(2) + torch.arange(0, n, g, device=pre.device)).view(b, k * s)
    values, pick = torch.topk(pre.gather(1, cand), k, dim=1, sorted=sorted)
    return values, cand.gather(1, pick)


def topk_indices(pre: Tensor, k: int) -> Tensor:
    """``torch.topk(pre, k, dim=1, sorted=True).indices`` (``two_stage_topk`` on CPU)."""
    return two_stage_topk(pre, k)[1]


def encoder_operands(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``lhs (b, d+1) = [x_in, 1]`` and ``rhs (d+1, n) = [W_enc; b_enc]`` in ``dtype``: ``lhs @ rhs`` is the
    pre-activation. The bias enters the matmul as an extra input column of ones: addmm first copies the
    broadcast bias into its (b, n) output, a full extra pass over the largest array."""
    lhs = torch.cat([x_in, x_in.new_ones(x_in.shape[0], 1)], 1).to(dtype)
    rhs = torch.cat([W_enc, b_enc[None].to(W_enc.dtype)], 0).to(dtype)
    return lhs, rhs


def _block_rows(b: int, device: torch.device) -> int:
    return CPU_BLOCK_ROWS if device.type == "cpu" else b


def select_plain(
    x_in: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, scale: Tensor | None, dead_cols: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Top-k of ``pre = (x_in @ W_enc + b_enc) * scale``: ``(indices (b, k), raw (b, k), dead_raw (b, n_dead))``.

    ``raw`` and ``dead_raw`` are the pre-activations before dropout (``scale``) at the chosen and the dead
    latents, in the matmul's dtype (bfloat16 under autocast).
    """
    b, device = x_in.shape[0], x_in.device
    block = _block_rows(b, device)
    matmul = _encoder_matmul(x_in, W_enc, b_enc)
    # Every block's matmul writes into one reused buffer, and the per-block results go straight into the
    # outputs (no concatenation): fewer large temporaries, and fewer page faults when the heap grows and
    # shrinks, 7-10 ms per step measured (b=4096, n=4096). Not under autocast, which chooses the matmul's
    # dtype (an out= matmul would run in float32).
    buf = None
    if b > block and not torch.is_autocast_enabled(device.type) and not _use_onednn(x_in):
        buf = x_in.new_empty(block, W_enc.shape[1])
    indices = torch.empty(b, k, dtype=torch.long, device=device)
    gathered = dead_raw = None
    for start in range(0, b, block):
        rows = slice(start, min(start + block, b))
        raw = matmul(rows, None if buf is None else buf[: rows.stop - start])
        if gathered is None:  # the matmul's dtype (bfloat16 under autocast)
            gathered = raw.new_empty(b, k)
            dead_raw = None if dead_cols is None else raw.new_empty(b, dead_cols.numel())
        if use_kernels(raw):  # top-k, and the dead latents' columns while the row is in cache
            _set_kernel_threads()
            sc = _NO_SCALE if scale is None else scale[rows].numpy()
            dead_np, dead_out = _dead_arrays(dead_cols, dead_raw, rows, np.float32)
            kernels.topk_rows(raw.numpy(), sc, k, kernels.n_groups_of(raw.shape[1]), indices[rows].numpy(),
                              gathered[rows].numpy(), dead_np, dead_out)
            continue
        idx = topk_indices(raw if scale is None else raw * scale[rows], k)
        indices[rows] = idx
        torch.gather(raw, 1, idx, out=gathered[rows])
        if dead_cols is not None:
            torch.index_select(raw, 1, dead_cols, out=dead_raw[rows])
    return indices, gathered, dead_raw


def _dead_arrays(dead_cols: Tensor | None, dead_raw: Tensor | None, rows: slice, dtype) -> tuple:
    """The dead columns and this block's output rows for a kernel (empty arrays without dead latents); bfloat16
    outputs go in as their int16 bit patterns."""
    if dead_cols is None:
        return _NO_COLS, np.empty((rows.stop - rows.start, 0), dtype)
    out = dead_raw[rows]
    return dead_cols.numpy(), (out.view(torch.int16) if out.dtype == torch.bfloat16 else out).numpy()


_NO_SCALE = np.empty((0, 0), np.float32)
_NO_COLS = np.empty(0, np.int64)


def _encoder_matmul(x_in: Tensor, W_enc: Tensor, b_enc: Tensor):
    """``matmul(rows, out) -> x_in[rows] @ W_enc + b_enc``, the fastest way on the device (``out``: a buffer
    for the result, or None)."""
    if _use_onednn(x_in):
        # oneDNN's float32 matmul with the bias fused: 21.5 ms against 25.8 ms for torch's default (MKL) per
        # (1024, 512) x (512, 4096) block on 2 cores of the AMD EPYC in BENCHMARKS.md. It takes the transposed
        # view as it is (as fast as a contiguous (n, d) copy, measured).
        return lambda rows, out: torch.ops.mkldnn._linear_pointwise(x_in[rows], W_enc.t(), b_enc, "none", [], "")
    if x_in.device.type == "cpu":
        lhs, rhs = encoder_operands(x_in, W_enc, b_enc, W_enc.dtype)
        return lambda rows, out: lhs[rows] @ rhs if out is None else torch.mm(lhs[rows], rhs, out=out)
    return lambda rows, out: torch.addmm(b_enc, x_in[rows], W_enc)


def _use_onednn(x_in: Tensor) -> bool:
    return ONEDNN and x_in.dtype == torch.float32 and x_in.device.type == "cpu" and not torch.is_autocast_enabled("cpu")


def use_kernels(t: Tensor) -> bool:
    """Whether the numba kernels serve ``t``: float32 on CPU (other dtypes take the torch operations)."""
    return KERNELS and t.device.type == "cpu" and t.dtype == torch.float32


def _set_kernel_threads() -> None:
    """numba's threads follow torch's thread count (``--threads``), within numba's own maximum."""
    want = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != want:
        numba.set_num_threads(want)


def filter_error_bound(x_in: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    """``(b,)``: a bound on ``|filter value - float32 value|`` over every entry of each row.

    The filter rounds ``a = [x, 1]`` and ``w = [W_enc[:, c]; b_c]`` to bfloat16 (relative error <= u = 2^-8
    each), multiplies them exactly and accumulates in float32 (error <= gamma * S, gamma = (d+1) 2^-24 / (1 -
    (d+1) 2^-24), Higham, "Accuracy and Stability of Numerical Algorithms", eq. 3.5), then rounds the sum to
    bfloat16 (<= u |s|). With ``S = sum |a_i w_i| <= ||x|| ||W_enc[:, c]|| + |b_c|``, the filter is within
    ``(u (1+u)^2 (1+gamma) + 2u + u^2 + gamma (1+u)^2) S`` of the exact value, and the float32 value within
    ``gamma S``; the bound adds both, with a margin for the float32 product by the dropout scale.
    """
    u = BF16_UNIT_ROUNDOFF
    nu = (x_in.shape[1] + 1) * FP32_UNIT_ROUNDOFF
    gamma = nu / (1.0 - nu)
    c = u * (1 + u) ** 2 * (1 + gamma) + 2 * u + u * u + gamma * (1 + u) ** 2 + gamma + 4 * FP32_UNIT_ROUNDOFF
    w_max = torch.linalg.vector_norm(W_enc, dim=0).max()
    s = torch.linalg.vector_norm(x_in, dim=1) * w_max + b_enc.abs().max()
    # A tiny absolute term covers flushing of subnormal products to zero.
    return (c * s + 1e-30).float()


def sampled_pre(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, cols: Tensor) -> Tensor:
    """``(x_in @ W_enc + b_enc)`` at ``cols (b, m)`` only, in float32 dot products; ``(b, m)``."""
    b, m = cols.shape
    n = W_enc.shape[1]
    crow = torch.arange(0, b * m + 1, m, device=x_in.device)
    # A sampled dense-dense product on the (b, n) pattern, in the candidates' order (which the CPU kernel
    # accepts unsorted), without gathering the (b, m, d) columns.
    pattern = csr(crow, cols.reshape(-1), x_in.new_zeros(b * m), (b, n))
    dots = torch.sparse.sampled_addmm(pattern, x_in, W_enc, beta=0.0).values().reshape(b, m)
    return dots + b_enc[cols]


def select_filtered(
    x_in: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, scale: Tensor | None, dead_cols: Tensor | None,
    max_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """``select_plain``'s latents through the bf16 filter: ``(indices, raw, dead_raw, n_exact)``.

    ``raw`` holds the exact float32 pre-activations at the chosen latents; ``dead_raw`` the filter's bfloat16
    values at the dead latents (the auxiliary losses run in bfloat16). ``max_scale`` is the largest dropout
    multiplier. ``n_exact`` counts the exact pre-activations computed (``k`` per row at the least).
    """
    b, n = x_in.shape[0], W_enc.shape[1]
    device = x_in.device
    block = _block_rows(b, device)
    matmul = _filter_matmul(x_in, W_enc, b_enc, min(block, b))
    dead_raw = None if dead_cols is None else x_in.new_empty(b, dead_cols.numel(), dtype=torch.bfloat16)
    eps = filter_error_bound(x_in, W_enc, b_enc) * max_scale
    rerank = _Rerank(x_in, W_enc, b_enc, k, scale, eps) if use_kernels(x_in) else _Certify(b, n, k, scale, device)
    for start in range(0, b, block):
        rows = slice(start, min(start + block, b))
        approx = matmul(rows)
        if not rerank.block(rows, approx, dead_cols, dead_raw) and dead_cols is not None:
            torch.index_select(approx, 1, dead_cols, out=dead_raw[rows])
    indices, raw, n_exact = rerank.finish(x_in, W_enc, b_enc, eps)
    return indices, raw, dead_raw, n_exact


class _Rerank:
    """The CPU way: each block's exact top-k straight from its filter values (``kernels.rerank_rows``)."""

    def __init__(self, x_in: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, scale: Tensor | None, eps: Tensor):
        b = x_in.shape[0]
        self.k, self.scale = k, scale
        self.x, self.W_t, self.b_enc = x_in.contiguous().numpy(), W_enc.t().contiguous().numpy(), b_enc.numpy()
        self.eps = eps.numpy()
        self.indices = torch.empty(b, k, dtype=torch.long)
        self.raw = torch.empty(b, k, dtype=torch.float32)
        self.n_exact = np.zeros(b, np.int32)
        _set_kernel_threads()

    def block(self, rows: slice, approx: Tensor, dead_cols: Tensor | None, dead_raw: Tensor | None) -> bool:
        """Rerank one block (and copy out its dead columns); True: the dead columns are done."""
        sc = _NO_SCALE if self.scale is None else self.scale[rows].numpy()
        dead_np, dead_out = _dead_arrays(dead_cols, dead_raw, rows, np.int16)
        kernels.rerank_rows(
            approx.view(torch.int16).numpy(), sc, self.x[rows], self.W_t, self.b_enc, self.eps[rows], self.k,
            kernels.n_groups_of(approx.shape[1]), self.indices[rows].numpy(), self.raw[rows].numpy(),
            self.n_exact[rows], dead_np, dead_out,
        )
        return True

    def finish(self, *_) -> tuple[Tensor, Tensor, int]:
        return self.indices, self.raw, int(self.n_exact.sum())


class _Certify:
    """Any device: each row's best ``CANDIDATES * k`` filter entries, their exact values in one sampled product,
    and a certificate per row; rows without one are recomputed in float32."""

    def __init__(self, b: int, n: int, k: int, scale: Tensor | None, device: torch.device):
        self.k, self.n, self.scale = k, n, scale
        self.m = min(n, CANDIDATES * k)
        self.cand = torch.empty(b, self.m, dtype=torch.long, device=device)
        self.floor = torch.empty(b, dtype=torch.float32, device=device)  # each row's smallest candidate filter value

    def block(self, rows: slice, approx: Tensor, dead_cols: Tensor | None, dead_raw: Tensor | None) -> bool:
        vals, idx = two_stage_topk(approx if self.scale is None else approx * self.scale[rows], self.m, sorted=False)
        self.cand[rows] = idx
        self.floor[rows] = vals.amin(1).float()
        return False

    def finish(self, x_in: Tensor, W_enc: Tensor, b_enc: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, int]:
        cand, floor, k, scale = self.cand, self.floor, self.k, self.scale
        exact = sampled_pre(x_in, W_enc, b_enc, cand)
        ranked = exact if scale is None else exact * scale.gather(1, cand)
        top, pos = torch.topk(ranked, k, dim=1, sorted=True)
        indices, raw = cand.gather(1, pos), exact.gather(1, pos)
        if self.m == self.n:
            return indices, raw, exact.numel()
        # Any entry outside the candidates has a filter value <= floor, so an exact value <= floor + eps: the
        # row is certain when that stays below its k-th exact value (NaN rows fail and are recomputed).
        redo = torch.nonzero(~(floor + eps < top[:, -1].float())).squeeze(1)
        if redo.numel():
            idx, val, _ = select_plain(x_in[redo], W_enc, b_enc, k, None if scale is None else scale[redo], None)
            indices[redo], raw[redo] = idx, val
        return indices, raw, exact.numel() + int(redo.numel()) * self.n


def _filter_matmul(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, block: int):
    """``matmul(rows) -> x_in[rows] @ W_enc + b_enc`` in bfloat16 (inputs rounded, float32 accumulation)."""
    if _use_onednn(x_in):
        # oneDNN directly on the bfloat16 copies, the transposed weight view as it is (no concatenated operands).
        x_bf, W_bf, b_bf = x_in.to(torch.bfloat16), W_enc.t().to(torch.bfloat16), b_enc.to(torch.bfloat16)
        return lambda rows: torch.ops.mkldnn._linear_pointwise(x_bf[rows], W_bf, b_bf, "none", [], "")
    lhs, rhs = encoder_operands(x_in, W_enc, b_enc, torch.bfloat16)
    buf = lhs.new_empty(block, W_enc.shape[1])
    return lambda rows: _bf16_mm(lhs[rows], rhs, buf[: rows.stop - rows.start])


def _bf16_mm(lhs: Tensor, rhs: Tensor, out: Tensor) -> Tensor:
    """``lhs @ rhs`` in bfloat16 with float32 accumulation throughout, as ``filter_error_bound`` assumes (on
    CUDA, cuBLAS may otherwise reduce split-K partial sums in bfloat16)."""
    if lhs.device.type != "cuda":
        return torch.mm(lhs, rhs, out=out)
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_bf16_reduced_precision_reduction
    matmul.allow_bf16_reduced_precision_reduction = False
    try:
        return torch.mm(lhs, rhs, out=out)
    finally:
        matmul.allow_bf16_reduced_precision_reduction = before
