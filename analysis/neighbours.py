"""NeighbourIndex: nearest neighbours in the paper's three spaces.

Dense spaces (embeddings Ψ, reconstructions Ψ̂) are searched with FAISS: exact ``"Flat"`` by default, or any
FAISS factory string (``"IVF1024,Flat"``, ``"HNSW32"``, ``"IVF1024,PQ64"`` ...) with its search-time knobs
(``nprobe``, ``ef_search``); ``recall_at_n`` measures such an index against the exact one. Code space Φ̂ is
searched exactly from the sparse codes through their inverted lists (a query's candidates are the rows that
share at least one of its latents; every other row has cosine 0), so the dense ``(n, n_latents)`` matrix is
never built.

Scores: for ``metric="cosine"`` the cosine similarity (higher is nearer), for ``metric="l2"`` the squared
Euclidean distance (lower is nearer). Results are always nearest first.

A fitted index is saved as a directory (``save``/``NeighbourIndex.load``): FAISS's own binary index file (never
pickled) or the code index's CSR arrays, the indexed rows, ``config.json`` and ``meta.json``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import scipy.sparse as sp

from analysis.code_search import top_positive
from analysis.stats import measure
from artifacts import SCHEMA_VERSION, ArtifactError, building, package_version, read_json, write_json, write_npy

METRICS = ("cosine", "l2")
DEVICES = ("cpu", "cuda")
SPARSE_BATCH_ENTRIES = 20_000_000
"""Most candidate entries (query × row pairs sharing a latent) one sparse product may hold: bounds its memory."""


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
    given ``rows`` of it (e.g. the train split); ``search`` returns original row numbers. ``nprobe`` (IVF) and
    ``ef_search`` (HNSW) tune approximate FAISS indexes; ``device="cuda"`` moves a dense index to FAISS's GPU
    index (needs the FAISS GPU build and a GPU). In code space ``fast`` uses the compiled kernel of
    ``analysis.code_search``; ``fast=False`` is its plain reference twin (sparse product, selection in Python).
    """

    def __init__(self, metric: str = "cosine", factory: str = "Flat", batch_size: int = 1024, *,
                 nprobe: int | None = None, ef_search: int | None = None, device: str = "cpu", fast: bool = True):
        if metric not in METRICS:
            raise ValueError(f"--metric must be one of {METRICS}, got {metric!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for name, value in (("--nprobe", nprobe), ("--ef-search", ef_search)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if device not in DEVICES:
            raise ValueError(f"--device must be one of {DEVICES}, got {device!r}")
        self.metric = metric
        self.factory = factory
        self.batch_size = batch_size
        self.nprobe = nprobe
        self.ef_search = ef_search
        self.device = device
        self.fast = fast

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
            self.has_negative_ = bool((self.inverted_.data < 0).any())  # the paper variant's codes
            self.dim_ = data.n_latents
        else:
            self.sparse_ = False
            x = self._prepare(np.asarray(data[self.rows_] if rows is not None else data))
            self.dim_ = x.shape[1]
            faiss_metric = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
            try:
                index = faiss.index_factory(self.dim_, self.factory, faiss_metric)
            except RuntimeError as e:
                raise ValueError(f"--factory {self.factory!r} is not a FAISS index factory string "
                                 f"({str(e).strip().splitlines()[-1]})") from e
            if not index.is_trained:
                try:
                    index.train(x)
                except RuntimeError as e:
                    raise ValueError(f"the FAISS index {self.factory!r} cannot be trained on {len(x)} rows "
                                     f"({str(e).strip().splitlines()[-1]}); use fewer lists/codes or 'Flat'") from e
            index.add(x)
            self.index_ = self._to_device(index)
            self._apply_search_parameters()
        self.n_ = int(self.rows_.size)
        return self

    def _to_device(self, index):
        if self.device == "cpu":
            return index
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
            raise ValueError("--device cuda needs the FAISS GPU build (faiss-gpu) and a visible GPU; "
                             "this FAISS has no GPU support here: use --device cpu")
        self._gpu_resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)

    def set_search_parameters(self, *, nprobe: int | None = None, ef_search: int | None = None) -> "NeighbourIndex":
        """Change ``nprobe`` (IVF) or ``ef_search`` (HNSW) of a fitted dense index without rebuilding it."""
        self._check_fitted()
        if self.sparse_:
            raise ValueError("the code-space index is exact; it has no search parameters")
        for name, value in (("--nprobe", nprobe), ("--ef-search", ef_search)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.nprobe = self.nprobe if nprobe is None else nprobe
        self.ef_search = self.ef_search if ef_search is None else ef_search
        self._apply_search_parameters()
        return self

    def _apply_search_parameters(self) -> None:
        space = faiss.GpuParameterSpace() if self.device == "cuda" else faiss.ParameterSpace()
        for name, flag, value in (("nprobe", "--nprobe", self.nprobe), ("efSearch", "--ef-search", self.ef_search)):
            if value is None:
                continue
            try:
                space.set_index_parameter(self.index_, name, value)
            except RuntimeError as e:
                raise ValueError(f"{flag} does not apply to the FAISS index {self.factory!r}") from e

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
        for start, stop in self._batches(queries, m):
            if self.sparse_:
                s, pos = self._search_sparse(queries.take(np.arange(start, stop)), want)
            else:
                s, pos = self._search_dense(np.asarray(queries[start:stop]), want)
            found = self.rows_[pos]
            drop = None if exclude is None else np.asarray(exclude[start:stop])[:, None]
            scores[start:stop], rows[start:stop] = _drop_excluded(s, found, drop, n_neighbours)
        return scores, rows

    def _batches(self, queries, m: int):
        """Query batches of ``batch_size``; in code space also cut so that no batch's candidate entries (the
        summed inverted-list lengths of its latents) pass ``SPARSE_BATCH_ENTRIES``: frequent latents make long
        lists, and the sparse product's output grows with them."""
        if not self.sparse_:
            yield from ((s, min(s + self.batch_size, m)) for s in range(0, m, self.batch_size))
            return
        lengths = np.diff(self.inverted_.indptr)
        start = 0
        while start < m:
            stop = min(start + self.batch_size, m)
            cost = np.cumsum(lengths[np.asarray(queries.indices[start:stop], dtype=np.int64)].sum(1))
            stop = start + max(1, int(np.searchsorted(cost, SPARSE_BATCH_ENTRIES, side="right")))
            yield start, min(stop, m)
            start = min(stop, m)

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
        if q.n_latents != self.dim_:
            raise ValueError(f"query codes have {q.n_latents} latents, the index {self.dim_}")
        qn = q.csr(normalise=True)
        if not self.fast or (qn.data < 0).any() or self.has_negative_:
            return self._search_sparse_reference(qn, want)
        scores, pos, n_positive = top_positive(qn, self.inverted_, want)
        short = np.flatnonzero(n_positive < want)  # rows of cosine 0 complete these: the reference's rule
        if short.size:
            scores[short], pos[short] = self._search_sparse_reference(qn[short], want)
        return scores, pos

    def _search_sparse_reference(self, qn: sp.csr_matrix, want: int) -> tuple[np.ndarray, np.ndarray]:
        """Cosines with every row that shares a latent: a sparse (m, n) product over the inverted lists, then
        each query's top rows (the plain twin of ``analysis.code_search``)."""
        sims = (qn @ self.inverted_).tocsr()
        scores = np.zeros((qn.shape[0], want), dtype=np.float32)
        pos = np.empty((qn.shape[0], want), dtype=np.int64)
        for i in range(qn.shape[0]):
            lo, hi = sims.indptr[i], sims.indptr[i + 1]
            scores[i], pos[i] = _top_with_zero_fill(sims.indices[lo:hi], sims.data[lo:hi], want, self.n_)
        return scores, pos

    # -- persistence --------------------------------------------------------------------------------------
    def save(self, index_dir: str | os.PathLike, *, parents: dict | None = None, overwrite: bool = False) -> Path:
        """Write the fitted index to ``index_dir`` atomically (``parents``: e.g. the store or codes hash)."""
        self._check_fitted()
        with building(index_dir, overwrite) as work:
            write_npy(work / "rows.npy", self.rows_)
            if self.sparse_:
                for name in ("indptr", "indices", "data"):
                    write_npy(work / f"inverted_{name}.npy", getattr(self.inverted_, name))
            else:
                cpu = faiss.index_gpu_to_cpu(self.index_) if self.device == "cuda" else self.index_
                faiss.write_index(cpu, str(work / "index.faiss"))
            write_json(work / "config.json", {"metric": self.metric, "factory": self.factory,
                                              "batch_size": self.batch_size, "nprobe": self.nprobe,
                                              "ef_search": self.ef_search, "sparse": self.sparse_})
            write_json(work / "meta.json", {"kind": "neighbour_index", "schema_version": SCHEMA_VERSION,
                                            "package_version": package_version(), "n": self.n_, "dim": self.dim_,
                                            "parents": parents or {}})
        return Path(index_dir)

    @classmethod
    def load(cls, index_dir: str | os.PathLike, device: str = "cpu") -> "NeighbourIndex":
        """A fitted index from a directory written by ``save``."""
        index_dir = Path(index_dir)
        meta = read_json(index_dir / "meta.json")
        if meta.get("kind") != "neighbour_index":
            raise ArtifactError(f"{index_dir} is not a saved neighbour index (meta kind {meta.get('kind')!r})")
        cfg = read_json(index_dir / "config.json")
        self = cls(cfg["metric"], cfg["factory"], cfg["batch_size"], nprobe=cfg["nprobe"],
                   ef_search=cfg["ef_search"], device=device)
        self.rows_ = np.load(index_dir / "rows.npy", allow_pickle=False)
        self.n_, self.dim_, self.sparse_ = int(meta["n"]), int(meta["dim"]), bool(cfg["sparse"])
        if self.sparse_:
            parts = [np.load(index_dir / f"inverted_{name}.npy", allow_pickle=False)
                     for name in ("data", "indices", "indptr")]
            self.inverted_ = sp.csr_matrix(tuple(parts), shape=(self.dim_, self.n_))
            self.has_negative_ = bool((self.inverted_.data < 0).any())
        else:
            self.index_ = self._to_device(faiss.read_index(str(index_dir / "index.faiss")))
            self._apply_search_parameters()
        return self


def recall_at_n(found_rows: np.ndarray, exact_rows: np.ndarray, provenance: str | None = None) -> dict:
    """Recall@n of an approximate search: per query, the fraction of the exact ``n`` nearest rows it found
    (``(m, n)`` row arrays), as a Measure dict over queries."""
    found_rows, exact_rows = np.asarray(found_rows), np.asarray(exact_rows)
    if found_rows.shape != exact_rows.shape:
        raise ValueError(f"found {found_rows.shape} and exact {exact_rows.shape} neighbour arrays differ in shape")
    # Row-wise membership by sorting: (m, n) at once, no Python loop over queries.
    m, n = exact_rows.shape
    offset = np.arange(m, dtype=np.int64)[:, None] * (int(max(found_rows.max(), exact_rows.max())) + 1)
    hits = np.isin(found_rows + offset, exact_rows + offset).sum(1)
    return measure(hits / n, provenance)


def _top_with_zero_fill(cand: np.ndarray, cand_scores: np.ndarray, want: int, n: int):
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


def _drop_excluded(scores, rows, drop, n_neighbours: int):
    if drop is None:
        return scores[:, :n_neighbours], rows[:, :n_neighbours]
    keep = rows != drop
    # Keep the first n_neighbours of each row that are not excluded (each query excludes at most one row).
    order = np.argsort(~keep, axis=1, kind="stable")[:, :n_neighbours]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
