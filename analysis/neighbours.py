"""NeighbourIndex: nearest neighbours in the paper's three spaces.

Dense spaces (embeddings Ψ, reconstructions Ψ̂) are searched with FAISS; code space Φ̂ is searched exactly from
the sparse codes through their inverted lists (a query's candidates are the rows that share at least one of its
latents; every other row has cosine 0), so the dense ``(n, n_latents)`` matrix is never built.

Scores: for ``metric="cosine"`` the cosine similarity (higher is nearer), for ``metric="l2"`` the squared
Euclidean distance (lower is nearer). Results are always nearest first.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import scipy.sparse as sp

METRICS = ("cosine", "l2")


@dataclass(frozen=True)
class SparseCodes:
    """Sparse codes of ``n`` rows: ``values``/``indices`` ``(n, k)`` over ``n_latents`` latents."""

    values: np.ndarray
    """Code values ``(n, k)``."""
    indices: np.ndarray
    """Latent indices ``(n, k)``."""
    n_latents: int
    """Width of the code space."""

    def __post_init__(self):
        if self.values.shape != self.indices.shape or self.values.ndim != 2:
            raise ValueError(f"codes values {self.values.shape} and indices {self.indices.shape} must be equal (n, k)")

    @property
    def n(self) -> int:
        return int(self.values.shape[0])

    def take(self, rows) -> "SparseCodes":
        rows = np.asarray(rows)
        return SparseCodes(np.asarray(self.values[rows]), np.asarray(self.indices[rows]), self.n_latents)

    def csr(self, normalise: bool) -> sp.csr_matrix:
        """The codes as a CSR matrix ``(n, n_latents)``; rows scaled to unit norm when ``normalise``."""
        # A copy: scipy sorts a CSR matrix's arrays in place, which must never reach the caller's codes.
        values = np.array(self.values, dtype=np.float32)
        if normalise:
            norms = np.linalg.norm(values, axis=1, keepdims=True)
            values = values / np.where(norms > 0, norms, 1.0)
        n, k = values.shape
        indptr = np.arange(0, n * k + 1, k, dtype=np.int64)
        matrix = sp.csr_matrix((values.ravel(), np.asarray(self.indices, dtype=np.int64).ravel(), indptr),
                               shape=(n, self.n_latents))
        matrix.sum_duplicates()
        return matrix

    def dense(self) -> np.ndarray:
        """The dense codes ``(n, n_latents)`` float32 (only for small sets)."""
        return self.csr(normalise=False).toarray()


class NeighbourIndex:
    """Exact (or FAISS-approximate) nearest neighbours, in the scikit-learn habit.

    ``fit(data, rows=None)`` indexes ``data`` (an ``(n, d)`` array or ``SparseCodes``), optionally only the
    given ``rows`` of it (e.g. the train split); ``search`` returns original row numbers.
    """

    def __init__(self, metric: str = "cosine", factory: str = "Flat", batch_size: int = 1024):
        if metric not in METRICS:
            raise ValueError(f"--metric must be one of {METRICS}, got {metric!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.metric = metric
        self.factory = factory
        self.batch_size = batch_size

    # -- fitting ------------------------------------------------------------------------------------------
    def fit(self, data, rows=None) -> "NeighbourIndex":
        n_all = data.n if isinstance(data, SparseCodes) else len(data)
        self.rows_ = np.arange(n_all, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        if isinstance(data, SparseCodes):
            if self.metric != "cosine":
                raise ValueError("code-space search supports metric='cosine' only")
            self.sparse_ = True
            codes = data if rows is None else data.take(self.rows_)
            # Transposed CSR = inverted lists with each entry's (normalised) value.
            self.inverted_ = codes.csr(normalise=True).T.tocsr()
            self.dim_ = data.n_latents
        else:
            self.sparse_ = False
            x = self._prepare(np.asarray(data[self.rows_] if rows is not None else data))
            self.dim_ = x.shape[1]
            faiss_metric = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
            self.index_ = faiss.index_factory(self.dim_, self.factory, faiss_metric)
            if not self.index_.is_trained:
                self.index_.train(x)
            self.index_.add(x)
        self.n_ = int(self.rows_.size)
        return self

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 2:
            raise ValueError(f"expected an (n, d) array, got shape {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or Inf")
        if self.metric == "cosine":
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x

    def _check_fitted(self) -> None:
        if not hasattr(self, "rows_"):
            raise RuntimeError("this NeighbourIndex is not fitted yet; call fit(data) first")

    # -- search -------------------------------------------------------------------------------------------
    def search(self, queries, n_neighbours: int, exclude=None) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, rows)`` each ``(n_queries, n_neighbours)``, nearest first.

        ``queries`` is an array ``(m, d)`` (dense index) or ``SparseCodes`` (code index). ``exclude`` is an
        optional ``(m,)`` array of original row numbers never to return for each query (its own row: the
        ``exclude_self`` of queries drawn from the indexed rows); ``-1`` excludes nothing.
        """
        self._check_fitted()
        m = queries.n if isinstance(queries, SparseCodes) else len(queries)
        if isinstance(queries, SparseCodes) != self.sparse_:
            raise ValueError("query kind (sparse codes or dense array) must match what the index was fitted on")
        n_extra = 0 if exclude is None else 1
        want = n_neighbours + n_extra
        if not 1 <= n_neighbours <= self.n_ - n_extra:
            raise ValueError(f"n_neighbours must be in [1, {self.n_ - n_extra}], got {n_neighbours}")
        scores = np.empty((m, n_neighbours), dtype=np.float32)
        rows = np.empty((m, n_neighbours), dtype=np.int64)
        for start in range(0, m, self.batch_size):
            stop = min(start + self.batch_size, m)
            if self.sparse_:
                s, pos = self._search_sparse(queries.take(np.arange(start, stop)), want)
            else:
                s, pos = self._search_dense(np.asarray(queries[start:stop]), want)
            found = self.rows_[pos]
            drop = None if exclude is None else np.asarray(exclude[start:stop])[:, None]
            scores[start:stop], rows[start:stop] = _drop_excluded(s, found, drop, n_neighbours)
        return scores, rows

    def _search_dense(self, q: np.ndarray, want: int) -> tuple[np.ndarray, np.ndarray]:
        q = self._prepare(q)
        if q.shape[1] != self.dim_:
            raise ValueError(f"queries have width {q.shape[1]}, the index {self.dim_}")
        scores, pos = self.index_.search(q, want)
        if (pos < 0).any():
            raise RuntimeError(f"the FAISS index {self.factory!r} found fewer than {want} neighbours; "
                               "raise nprobe or use the exact 'Flat' index")
        return scores, pos

    def _search_sparse(self, q: SparseCodes, want: int) -> tuple[np.ndarray, np.ndarray]:
        # Cosines with every row that shares a latent: a sparse (m, n) product over the inverted lists.
        sims = (q.csr(normalise=True) @ self.inverted_).tocsr()
        scores = np.zeros((q.n, want), dtype=np.float32)
        pos = np.empty((q.n, want), dtype=np.int64)
        for i in range(q.n):
            lo, hi = sims.indptr[i], sims.indptr[i + 1]
            cand, cand_scores = sims.indices[lo:hi], sims.data[lo:hi]
            scores[i], pos[i] = _top_with_zero_fill(cand, cand_scores, want, self.n_)
        return scores, pos


def _top_with_zero_fill(cand: np.ndarray, cand_scores: np.ndarray, want: int, n: int):
    """The ``want`` nearest rows: positive candidates best first, then rows of cosine 0 (sharing no latent, or
    cancelling), lowest row first, then negative candidates (possible only with the paper variant's codes)."""
    positive = cand_scores > 0
    pos_rows, pos_scores = cand[positive], cand_scores[positive]
    if pos_rows.size > want:
        part = np.argpartition(-pos_scores, want - 1)[:want]
        pos_rows, pos_scores = pos_rows[part], pos_scores[part]
    order = np.lexsort((pos_rows, -pos_scores))
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


def _drop_excluded(scores, rows, drop, n_neighbours: int):
    if drop is None:
        return scores[:, :n_neighbours], rows[:, :n_neighbours]
    keep = rows != drop
    # Keep the first n_neighbours of each row that are not excluded (each query excludes at most one row).
    order = np.argsort(~keep, axis=1, kind="stable")[:, :n_neighbours]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
