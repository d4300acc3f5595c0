"""Exact top-n by cosine in code space, pruned with upper bounds (the "MaxScore" idea of text retrieval:
Turtle & Flood 1995, "Query evaluation: strategies and optimizations").

Code-space search reads the inverted lists of a query's latents; with a skewed latent frequency a few lists hold
most of the rows (a latent active on 17% of 1.28M images has 220k), and the plain sparse product over every list
(``NeighbourIndex``'s reference path) spends its time there. A row's cosine with the query is
``Σ_l q_l r_l``, and ``r_l <= M_l``, the largest value in latent ``l``'s list. So with ``θ``, a score some ``n``
rows are known to reach, the longest lists whose bounds ``Σ q_l M_l`` stay below ``θ`` can be skipped: a row found
only in them scores less than ``θ`` and cannot be among the ``n`` nearest. ``θ`` comes from fully scoring the rows
of the query's shortest lists. Every candidate is then scored exactly from its own codes, so the result equals the
reference. Negative code values (the paper variant) void the bounds; such data use the reference path.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

PASS1_ROWS = 4
"""The first pass scores the query's shortest lists until they hold this many times n rows."""
PAIR_CHUNK = 1 << 20
"""(query, row) pairs scored at a time: bounds the gathered (pairs, k) temporaries."""


class PrunedCodeSearch:
    """Exact cosine top-n over normalised codes given as inverted lists ``(n_latents, n)`` CSR."""

    def __init__(self, inverted: sp.csr_matrix):
        self.inverted = inverted
        self.lengths = np.diff(inverted.indptr)
        forward = inverted.T.tocsr()
        per_row = np.diff(forward.indptr)
        k = int(per_row[0]) if per_row.size else 0
        # Every row carries exactly k entries (explicit zeros included): its codes as dense (n, k) arrays.
        self.usable = bool(per_row.size and (per_row == k).all() and k > 0 and (inverted.data >= 0).all())
        if self.usable:
            self.row_latents = forward.indices.reshape(-1, k)
            self.row_values = forward.data.reshape(-1, k)
            nonempty = self.lengths > 0
            self.max_value = np.zeros(inverted.shape[0], dtype=np.float32)
            self.max_value[nonempty] = np.maximum.reduceat(inverted.data, inverted.indptr[:-1][nonempty])

    def search(self, q: sp.csr_matrix, want: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query of ``q`` (normalised codes ``(m, n_latents)``, values >= 0): ``(candidate rows, exact
        cosines)`` holding every row that can be among its ``want`` nearest."""
        q = q.tocsr()
        q_dense = q.toarray()
        owner = np.repeat(np.arange(q.shape[0]), np.diff(q.indptr))
        length = self.lengths[q.indices]
        # Pass 1: the shortest lists, until they hold PASS1_ROWS * want rows; their want-th best score is theta.
        order = np.lexsort((length, owner))
        before = _segment_cumsum(length[order], q.indptr) - length[order]
        first = np.zeros(q.nnz, dtype=bool)
        first[order] = before < PASS1_ROWS * want
        theta = np.array([_kth(s, want) for _, s in self._scored(q_dense, _masked(q, first))])
        # Pass 2: skip the longest lists while their summed bounds stay below theta.
        order = np.lexsort((-length, owner))
        bound = _segment_cumsum(q.data[order] * self.max_value[q.indices[order]], q.indptr)
        skip = np.zeros(q.nnz, dtype=bool)
        skip[order] = bound < theta[owner[order]]
        return self._scored(q_dense, _masked(q, ~skip))

    def _scored(self, q_dense: np.ndarray, q: sp.csr_matrix) -> list[tuple[np.ndarray, np.ndarray]]:
        """Rows sharing a kept latent with each query, with their exact cosines from their own codes."""
        reach = (q @ self.inverted).tocsr()
        rows = reach.indices
        owner = np.repeat(np.arange(q.shape[0]), np.diff(reach.indptr))
        scores = np.empty(rows.size, dtype=np.float32)
        for start in range(0, rows.size, PAIR_CHUNK):
            r, o = rows[start : start + PAIR_CHUNK], owner[start : start + PAIR_CHUNK]
            scores[start : start + PAIR_CHUNK] = (q_dense[o[:, None], self.row_latents[r]] * self.row_values[r]).sum(1)
        return [(rows[lo:hi], scores[lo:hi]) for lo, hi in zip(reach.indptr[:-1], reach.indptr[1:])]


def _masked(q: sp.csr_matrix, keep: np.ndarray) -> sp.csr_matrix:
    """``q`` with the entries where ``keep`` is False set to zero (structure kept, so the product skips none of
    its work for them... hence removed): a CSR of only the kept entries."""
    owner = np.repeat(np.arange(q.shape[0]), np.diff(q.indptr))
    return sp.csr_matrix((q.data[keep], (owner[keep], q.indices[keep])), shape=q.shape)


def _segment_cumsum(values: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """Cumulative sums restarting at each segment ``indptr[i]:indptr[i + 1]`` (values in segment order)."""
    total = np.cumsum(values, dtype=np.float64)
    starts = indptr[:-1][np.diff(indptr) > 0]
    offset = np.zeros(values.size, dtype=np.float64)
    offset[starts] = np.where(starts > 0, total[starts - 1], 0.0)
    return total - np.maximum.accumulate(np.where(np.isin(np.arange(values.size), starts), offset, -np.inf)) \
        if values.size else total


def _kth(scores: np.ndarray, k: int) -> float:
    """The k-th largest positive score, or 0 when fewer than k are positive (then nothing is pruned)."""
    positive = scores[scores > 0]
    if positive.size < k:
        return 0.0
    return float(np.partition(positive, positive.size - k)[positive.size - k])
