"""The code-space backend of ``NeighbourIndex``: exact cosine over sparse codes Φ̂ through inverted lists.

A query's candidates are the rows that share at least one of its latents; every other row has cosine 0, so the
dense ``(n, n_latents)`` matrix is never built. The inverted lists (per latent: the rows that select it, with each
entry's value in its row's unit-normalised code) are built with numpy; search runs the compiled kernel of
``analysis.code_search`` (``fast=True``) or its plain reference twin (``fast=False``: a sparse product with every
list, then each query's top rows in Python). Queries are batched so that no batch's candidate entries pass
``SPARSE_BATCH_ENTRIES``. Saved as the lists' three ``.npy`` arrays, loaded memory-mapped on request.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from analysis.code_search import top_positive

SPARSE_BATCH_ENTRIES = 20_000_000
"""Most candidate entries (query × row pairs sharing a latent) one sparse product may hold: bounds its memory."""
LIST_FILES = ("indptr", "indices", "data")


class Lists(NamedTuple):
    """CSR arrays ``(n_rows_of_the_matrix + 1,)``, ``(nnz,)``, ``(nnz,)`` of a ``shape`` matrix."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    shape: tuple[int, int]

    def scipy(self):
        import scipy.sparse as sp  # only the reference twin multiplies matrices

        return sp.csr_matrix((self.data, self.indices, self.indptr), shape=self.shape)


def code_rows(codes, normalise: bool = True) -> Lists:
    """The codes as CSR rows ``(n, n_latents)``, each row scaled to unit norm when ``normalise`` (a copy: the
    caller's codes are never changed); duplicate latents of a row stay separate entries, whose sum is the same."""
    values = np.array(codes.values, dtype=np.float32)
    if normalise:
        norms = np.linalg.norm(values, axis=1, keepdims=True)
        values = values / np.where(norms > 0, norms, 1.0)
    n, k = values.shape
    return Lists(np.arange(n + 1, dtype=np.int64) * k, np.asarray(codes.indices, dtype=np.int32).ravel(),
                 values.ravel(), (n, codes.n_latents))


def inverted_lists(codes) -> Lists:
    """Per latent, the rows that select it (ascending) with their normalised values: CSR ``(n_latents, n)``."""
    rows = code_rows(codes)
    n, k = codes.values.shape
    latents = rows.indices.astype(np.int64)
    order = np.argsort(latents, kind="stable")  # stable: rows ascending within each latent
    indptr = np.zeros(codes.n_latents + 1, dtype=np.int64)
    np.cumsum(np.bincount(latents, minlength=codes.n_latents), out=indptr[1:])
    return Lists(indptr, (order // max(k, 1)).astype(np.int32), rows.data[order], (codes.n_latents, n))


class CodeIndex:
    """Exact cosine search over ``SparseCodes``; positions are the rows of the fitted codes."""

    def __init__(self, batch_size: int = 1024, fast: bool = True):
        self.batch_size, self.fast = batch_size, fast

    def fit(self, codes) -> "CodeIndex":
        self.inverted_ = inverted_lists(codes)
        self.dim_, self.n_ = int(codes.n_latents), int(codes.n)
        self.has_negative_ = bool((self.inverted_.data < 0).any())  # the paper variant's codes
        return self

    def batches(self, queries, m: int, batch_size: int):
        """Query batches of ``batch_size``, also cut so that no batch's candidate entries (the summed list lengths
        of its latents) pass ``SPARSE_BATCH_ENTRIES``: frequent latents make long lists, and the sparse
        product's output grows with them."""
        lengths = np.diff(self.inverted_.indptr)
        start = 0
        while start < m:
            stop = min(start + batch_size, m)
            cost = np.cumsum(lengths[np.asarray(queries.indices[start:stop], dtype=np.int64)].sum(1))
            stop = start + max(1, int(np.searchsorted(cost, SPARSE_BATCH_ENTRIES, side="right")))
            yield start, min(stop, m)
            start = min(stop, m)

    def search(self, q, want: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, positions)`` of the ``want`` nearest rows of each query's codes."""
        if q.n_latents != self.dim_:
            raise ValueError(f"query codes have {q.n_latents} latents, the index {self.dim_}")
        qn = code_rows(q)
        if not self.fast or (qn.data < 0).any() or self.has_negative_:
            return self._reference(qn, want)
        scores, pos, n_positive = top_positive(qn, self.inverted_, want)
        short = np.flatnonzero(n_positive < want)  # rows of cosine 0 complete these: the reference's rule
        if short.size:
            scores[short], pos[short] = self._reference(_take_rows(qn, short), want)
        return scores, pos

    def _reference(self, qn: Lists, want: int) -> tuple[np.ndarray, np.ndarray]:
        """Cosines with every row that shares a latent: a sparse (m, n) product over the inverted lists, then
        each query's top rows (the plain twin of ``analysis.code_search``)."""
        sims = (qn.scipy() @ self.inverted_.scipy()).tocsr()
        scores = np.zeros((qn.shape[0], want), dtype=np.float32)
        pos = np.empty((qn.shape[0], want), dtype=np.int64)
        for i in range(qn.shape[0]):
            lo, hi = sims.indptr[i], sims.indptr[i + 1]
            scores[i], pos[i] = top_with_zero_fill(sims.indices[lo:hi], sims.data[lo:hi], want, self.n_)
        return scores, pos

    def save(self, work_dir: Path) -> None:
        from artifacts import write_npy

        for name in LIST_FILES:
            write_npy(work_dir / f"inverted_{name}.npy", getattr(self.inverted_, name))

    @classmethod
    def load(cls, index_dir: Path, cfg: dict, dim: int, n: int, *, mmap: bool = False) -> "CodeIndex":
        self = cls(cfg["batch_size"])
        indptr, indices, data = (np.load(index_dir / f"inverted_{name}.npy", mmap_mode="r" if mmap else None,
                                         allow_pickle=False) for name in LIST_FILES)
        if indptr.shape != (dim + 1,) or indices.shape != data.shape or int(indptr[-1]) != indices.size:
            raise ValueError(f"{index_dir}: the inverted lists do not fit together ({dim} latents, "
                             f"{indices.size} entries, pointers ending at {int(indptr[-1])})")
        self.inverted_ = Lists(np.asarray(indptr), np.asarray(indices), np.asarray(data), (dim, n))
        self.dim_, self.n_ = dim, n
        # Recorded when saved: scanning every entry of a memory-mapped index would read all of it.
        recorded = cfg.get("has_negative")
        self.has_negative_ = bool((self.inverted_.data < 0).any()) if recorded is None else bool(recorded)
        return self


def _take_rows(rows: Lists, which: np.ndarray) -> Lists:
    """CSR rows ``which`` of ``rows`` (each row holds the same number of entries)."""
    k = int(rows.indptr[1] - rows.indptr[0]) if rows.shape[0] else 0
    entries = (which[:, None] * k + np.arange(k)).ravel()
    return Lists(np.arange(which.size + 1, dtype=np.int64) * k, rows.indices[entries], rows.data[entries],
                 (which.size, rows.shape[1]))


def top_with_zero_fill(cand: np.ndarray, cand_scores: np.ndarray, want: int, n: int):
    """The ``want`` nearest rows: positive candidates best first, then rows of cosine 0 (sharing no latent, or
    cancelling), lowest row first, then negative candidates (possible only with the paper variant's codes)."""
    positive = cand_scores > 0
    pos_rows, pos_scores = cand[positive], cand_scores[positive]
    if pos_rows.size > want:
        # Keep every candidate tied with the want-th score, so that ties go to the lower row.
        kth = np.partition(pos_scores, pos_rows.size - want)[pos_rows.size - want]
        keep = pos_scores >= kth
        pos_rows, pos_scores = pos_rows[keep], pos_scores[keep]
    order = np.lexsort((pos_rows, -pos_scores))[:want]
    rows, scores = pos_rows[order], pos_scores[order]
    need = want - rows.size
    if need > 0:
        nonzero = cand[cand_scores != 0]
        zeros = np.setdiff1d(np.arange(min(n, need + nonzero.size)), nonzero)[:need]
        neg = cand_scores < 0
        neg_order = np.lexsort((cand[neg], -cand_scores[neg]))[: need - zeros.size]
        rows = np.concatenate([rows, zeros, cand[neg][neg_order]])
        scores = np.concatenate([scores, np.zeros(zeros.size, np.float32), cand_scores[neg][neg_order]])
    return scores.astype(np.float32), rows
