"""The compiled kernel of exact code-space search: top-n by cosine over inverted lists, one query at a time.

The reference (``NeighbourIndex`` with ``fast=False``, in ``analysis.code_index``) forms the sparse product of the
queries with every inverted list, then selects each query's top rows in Python. At ImageNet scale with a skewed
latent frequency a query reaches a quarter of a million rows, and the product (one thread, a sorted output per
query) plus the per-query selection bound it to a few dozen queries per second. This kernel (numba, one thread per
slice of the queries) walks the query's lists into a dense accumulator of the index's size, remembers the rows it
touched, and keeps the best ``want`` of them in a small heap, then clears what it touched: work proportional to the
entries read, no sort of all candidates, no Python per query.

Scores and ties follow the reference: highest cosine first, the lower row first among equals. Only positive
scores are selected; a query with fewer than ``want`` of them (the rest are rows of cosine 0, filled in by the
caller) is marked by its count.
"""

from __future__ import annotations

import numba
import numpy as np

SERIAL_BELOW = 8
"""Batches of fewer queries run on the calling thread."""


@numba.njit(cache=True, nogil=True)
def _better(s1, r1, s2, r2) -> bool:
    return s1 > s2 or (s1 == s2 and r1 < r2)


@numba.njit(cache=True, nogil=True)
def _sift_down(hs, hr, size, i) -> None:
    """Restore the min-heap (worst kept candidate at the root) below position ``i``."""
    while True:
        left, worst = 2 * i + 1, i
        for child in (left, left + 1):
            if child < size and _better(hs[worst], hr[worst], hs[child], hr[child]):
                worst = child
        if worst == i:
            return
        hs[i], hs[worst] = hs[worst], hs[i]
        hr[i], hr[worst] = hr[worst], hr[i]
        i = worst


@numba.njit(cache=True, nogil=True)
def _one_query(lo, hi, q_latents, q_values, inv_indptr, inv_rows, inv_values, acc, seen, touched, want, hs, hr):
    """Top ``want`` positive (score, row) of one query into the heap arrays; returns (kept, positive count)."""
    n_touched = 0
    for e in range(lo, hi):
        latent, weight = q_latents[e], q_values[e]
        for p in range(inv_indptr[latent], inv_indptr[latent + 1]):
            row = inv_rows[p]
            if not seen[row]:
                seen[row] = True
                touched[n_touched] = row
                n_touched += 1
            acc[row] += weight * inv_values[p]
    size, n_positive = 0, 0
    for j in range(n_touched):
        row = touched[j]
        score = acc[row]
        acc[row] = 0.0
        seen[row] = False
        if score <= 0:
            continue
        n_positive += 1
        if size < want:
            hs[size], hr[size] = score, row
            size += 1
            if size == want:
                for i in range(want // 2 - 1, -1, -1):
                    _sift_down(hs, hr, size, i)
        elif _better(score, row, hs[0], hr[0]):
            hs[0], hr[0] = score, row
            _sift_down(hs, hr, size, 0)
    return size, n_positive


@numba.njit(cache=True, nogil=True)
def _top_slice(t, n_slices, q_indptr, q_latents, q_values, inv_indptr, inv_rows, inv_values, n, want,
               out_scores, out_rows, out_positive):
    """Queries ``t, t + n_slices, ...``: each thread owns its accumulator of the index's size."""
    m = q_indptr.shape[0] - 1
    acc = np.zeros(n, dtype=np.float32)
    seen = np.zeros(n, dtype=np.bool_)
    touched = np.empty(n, dtype=np.int64)
    hs = np.empty(want, dtype=np.float32)
    hr = np.empty(want, dtype=np.int64)
    for i in range(t, m, n_slices):
        size, n_positive = _one_query(q_indptr[i], q_indptr[i + 1], q_latents, q_values, inv_indptr,
                                      inv_rows, inv_values, acc, seen, touched, want, hs, hr)
        for j in range(size):
            out_scores[i, j] = hs[j]
            out_rows[i, j] = hr[j]
        _fix_order(out_scores[i], out_rows[i], size)
        out_positive[i] = n_positive


@numba.njit(cache=True, parallel=True)
def _top_parallel(q_indptr, q_latents, q_values, inv_indptr, inv_rows, inv_values, n, want, n_slices,
                  out_scores, out_rows, out_positive):
    for t in numba.prange(n_slices):
        _top_slice(t, n_slices, q_indptr, q_latents, q_values, inv_indptr, inv_rows, inv_values, n, want,
                   out_scores, out_rows, out_positive)


@numba.njit(cache=True, nogil=True)
def _fix_order(scores, rows, size) -> None:
    """Insertion sort of the kept heap by (score desc, row asc); ``size`` is at most ``want``."""
    for j in range(1, size):
        s, r = scores[j], rows[j]
        i = j - 1
        while i >= 0 and _better(s, r, scores[i], rows[i]):
            scores[i + 1], rows[i + 1] = scores[i], rows[i]
            i -= 1
        scores[i + 1], rows[i + 1] = s, r


def top_positive(q, inverted, want: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(scores (m, want), rows (m, want), n_positive (m,))`` for normalised query codes ``q`` (CSR ``(m, L)``)
    against the normalised inverted lists ``inverted`` (CSR ``(L, n)``); entries past ``n_positive`` are unset."""
    m, n = q.shape[0], inverted.shape[1]
    scores = np.zeros((m, want), dtype=np.float32)
    rows = np.zeros((m, want), dtype=np.int64)
    positive = np.zeros(m, dtype=np.int64)
    # The CSR arrays go in as they are (no copies of the index per call); numba compiles per dtype.
    args = (q.indptr, q.indices, np.asarray(q.data, np.float32), inverted.indptr, inverted.indices,
            np.asarray(inverted.data, np.float32), n, want)
    if m < SERIAL_BELOW:  # a thread pool's wake-up costs more than a few queries take
        _top_slice(0, 1, *args, scores, rows, positive)
    else:
        _top_parallel(*args, max(1, min(numba.get_num_threads(), m)), scores, rows, positive)
    return scores, rows, positive
