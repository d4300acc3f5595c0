"""Numba kernels of the CPU latent selection (``sae/selection.py``): each row's top-k of a block of
pre-activations, and the bf16 filter's exact re-ranking.

A row's top-k in two stages, as in EleutherAI sparsify's and FAISS's blocked selections: column ``c`` belongs to
group ``c mod G`` (``G = n / GROUP``), so the group maxima are element-wise maxima of ``GROUP`` contiguous slices
(vectorised). Every one of the k largest entries lies in one of the k groups with the largest maxima (a group
whose maximum ranks below k has k larger entries elsewhere), so only those groups' ``k * GROUP`` entries are
looked at one by one. The same two stages built from torch operations (group maxima, top-k, gather, top-k)
measured 11-12 ms per (1024, 4096) block on one core of the AMD EPYC in BENCHMARKS.md, as much as one
``torch.topk``: torch's top-k costs ~3 microseconds per row even for short rows.

Rows run in parallel in numba's threads (``numba.prange``); ``sae/selection.py`` sets as many as torch uses.
"""

from __future__ import annotations

import numba
import numpy as np

GROUP = 16
"""Entries per group; rows whose length is not a multiple of it are scanned whole."""

ROWS_PER_TASK = 32
"""Rows per parallel task: each task allocates its scratch once."""

_FAST = {"reassoc", "contract"}  # sums in any order (vectorised); no assumptions about NaN or infinities


@numba.njit(cache=True, inline="always")
def _insert(vals, idx, count, k, v, c):
    """Put ``(v, c)`` into the descending buffer ``vals[:count]`` of capacity k; returns the new count."""
    j = count if count < k else k - 1
    while j > 0 and vals[j - 1] < v:
        vals[j] = vals[j - 1]
        idx[j] = idx[j - 1]
        j -= 1
    vals[j] = v
    idx[j] = c
    return count + 1 if count < k else k


@numba.njit(cache=True, inline="always")
def _offer(row, c, vals, idx, count, k):
    if count < k or row[c] > vals[k - 1]:
        return _insert(vals, idx, count, k, row[c], c)
    return count


@numba.njit(cache=True)
def _group_max(row, gmax):
    """``gmax[g] = max(row[g::G])`` for ``G = len(gmax)`` (``len(row)`` a multiple of it)."""
    n_groups = gmax.shape[0]
    gmax[:] = row[:n_groups]
    for s in range(1, row.shape[0] // n_groups):
        part = row[s * n_groups : (s + 1) * n_groups]
        for g in range(n_groups):
            gmax[g] = max(gmax[g], part[g])


@numba.njit(cache=True)
def _row_topk(row, k, vals, idx, gmax, gvals, gidx):
    """The k largest entries of ``row`` into the descending buffers ``vals``/``idx``."""
    n = row.shape[0]
    n_groups = gmax.shape[0]
    if n_groups == 0 or k * GROUP * 2 > n:
        count = 0
        for c in range(n):
            count = _offer(row, c, vals, idx, count, k)
        return
    _group_max(row, gmax)
    count = 0
    for g in range(n_groups):
        count = _offer(gmax, g, gvals, gidx, count, k)
    count = 0
    for j in range(k):
        for s in range(GROUP):
            count = _offer(row, s * n_groups + gidx[j], vals, idx, count, k)


def n_groups_of(n: int) -> int:
    """Groups of a row of length n (0: the row is scanned whole)."""
    return n // GROUP if n % GROUP == 0 else 0


@numba.njit(cache=True, parallel=True)
def topk_rows(pre, scale, k, n_groups, out_idx, out_val, cols, out_cols):
    """For each row of ``pre (r, n)``: the k columns with the largest ``pre * scale`` (``scale``: ``(r, n)``, or
    ``(0, 0)`` for none), sorted descending, into ``out_idx (r, k)``; their ``pre`` into ``out_val (r, k)``; and
    ``pre[:, cols]`` into ``out_cols (r, len(cols))`` (the dead latents' columns)."""
    r, n = pre.shape
    has_scale = scale.shape[0] > 0
    for t in numba.prange((r + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        vals, idx = np.empty(k, pre.dtype), np.empty(k, np.int64)
        gmax, gvals, gidx = np.empty(n_groups, pre.dtype), np.empty(k, pre.dtype), np.empty(k, np.int64)
        ranked = np.empty(n, pre.dtype)
        for i in range(t * ROWS_PER_TASK, min((t + 1) * ROWS_PER_TASK, r)):
            if has_scale:
                for c in range(n):
                    ranked[c] = pre[i, c] * scale[i, c]
                _row_topk(ranked, k, vals, idx, gmax, gvals, gidx)
            else:
                _row_topk(pre[i], k, vals, idx, gmax, gvals, gidx)
            for j in range(k):
                out_idx[i, j] = idx[j]
                out_val[i, j] = pre[i, idx[j]]
            for j in range(cols.shape[0]):
                out_cols[i, j] = pre[i, cols[j]]


@numba.njit(cache=True, fastmath=_FAST)
def _exact(x, i, W_t, b_enc, c):
    """``x[i] . W_t[c] + b_enc[c]`` accumulated in float32 (in any order: ``filter_error_bound`` allows it)."""
    xi, wc = x[i], W_t[c]
    s = np.float32(0.0)
    for j in range(xi.shape[0]):
        s += xi[j] * wc[j]
    return s + b_enc[c]


@numba.njit(cache=True)
def _decode_bf16(bits_row, words):
    """bfloat16 bit patterns (int16) into float32 bit patterns (int32): the top 16 bits of a float32."""
    for c in range(bits_row.shape[0]):
        words[c] = (np.int32(bits_row[c]) & 0xFFFF) << 16


@numba.njit(cache=True, parallel=True)
def rerank_rows(bits, scale, x, W_t, b_enc, eps, k, n_groups, out_idx, out_raw, n_exact, cols, out_cols):
    """The exact top-k of each row from the bf16 filter values ``bits (r, n)`` (bfloat16 bit patterns as int16).

    Ranked by ``(x[i] . W_t[c] + b_enc[c]) * scale[i, c]`` (``scale`` ``(0, 0)``: none). First the exact values
    of the k best filter entries, then those of every entry whose filter value plus ``eps[i]`` (the bound of
    ``filter_error_bound`` times the largest scale) reaches the k-th best exact value so far, which only rises.
    An entry left out has an exact value below that k-th value, so the result is the exact top-k (ties apart).
    Writes indices (descending), exact unscaled values, the number of exact values computed per row, and the
    filter values (bit patterns) of the columns ``cols`` (the dead latents) into ``out_cols``.
    """
    r, n = bits.shape
    has_scale = scale.shape[0] > 0
    for t in numba.prange((r + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        words = np.empty(n, np.int32)
        f = words.view(np.float32)
        fvals, fidx, evals, eidx = np.empty(k, np.float32), np.empty(k, np.int64), np.empty(k, np.float32), np.empty(k, np.int64)
        gmax, gvals, gidx = np.empty(n_groups, np.float32), np.empty(k, np.float32), np.empty(k, np.int64)
        for i in range(t * ROWS_PER_TASK, min((t + 1) * ROWS_PER_TASK, r)):
            for j in range(cols.shape[0]):
                out_cols[i, j] = bits[i, cols[j]]
            _decode_bf16(bits[i], words)
            if has_scale:
                for c in range(n):
                    f[c] *= scale[i, c]
            _row_topk(f, k, fvals, fidx, gmax, gvals, gidx)
            count = 0
            for j in range(k):
                c = fidx[j]
                e = _exact(x, i, W_t, b_enc, c)
                count = _insert(evals, eidx, count, k, e * scale[i, c] if has_scale else e, c)
                f[c] = -np.inf  # evaluated
            n_exact[i] = k + _rest(x, i, W_t, b_enc, scale, has_scale, f, eps[i], n_groups, gmax, k, evals, eidx)
            for j in range(k):
                out_idx[i, j] = eidx[j]
                # With dropout a chosen entry's multiplier may be 0: its unscaled value is computed again.
                out_raw[i, j] = _exact(x, i, W_t, b_enc, eidx[j]) if has_scale else evals[j]


@numba.njit(cache=True)
def _rest(x, i, W_t, b_enc, scale, has_scale, f, eps, n_groups, gmax, k, evals, eidx):
    """Offer every entry of ``f`` whose filter value plus ``eps`` reaches the k-th exact value; returns how many
    exact values it computed. Whole groups are skipped by their maximum (``gmax`` from ``_row_topk``)."""
    n = f.shape[0]
    done = 0
    if n_groups == 0 or k * GROUP * 2 > n:
        for c in range(n):
            if f[c] + eps >= evals[k - 1]:
                done += _offer_exact(x, i, W_t, b_enc, scale, has_scale, c, k, evals, eidx)
        return done
    for g in range(n_groups):
        if gmax[g] + eps < evals[k - 1]:
            continue
        for s in range(GROUP):
            c = s * n_groups + g
            if f[c] + eps >= evals[k - 1]:
                done += _offer_exact(x, i, W_t, b_enc, scale, has_scale, c, k, evals, eidx)
    return done


@numba.njit(cache=True, inline="always")
def _offer_exact(x, i, W_t, b_enc, scale, has_scale, c, k, evals, eidx):
    e = _exact(x, i, W_t, b_enc, c)
    v = e * scale[i, c] if has_scale else e
    if v > evals[k - 1]:
        _insert(evals, eidx, k, k, v, c)
    return 1
