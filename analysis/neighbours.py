"""NeighbourIndex: nearest neighbours in the paper's three spaces, one interface over two backends.

Dense spaces (embeddings Ψ, reconstructions Ψ̂) go to ``analysis.dense_index`` (FAISS: exact ``"Flat"`` by
default, or any factory string such as ``"IVF1024,Flat"`` or ``"HNSW32"`` with ``nprobe``/``ef_search``);
``recall_at_n`` measures such an index against the exact one. Code space Φ̂ (``SparseCodes``) goes to
``analysis.code_index``: exact, through the codes' inverted lists, never through a dense ``(n, n_latents)`` matrix.
This module keeps what both share: the indexed rows (e.g. the train split), batching, the exclusion of each
query's own row, and persistence.

Scores: for ``metric="cosine"`` the cosine similarity (higher is nearer), for ``metric="l2"`` the squared
Euclidean distance (lower is nearer). Results are always nearest first.

A fitted index is saved as a directory (``save``/``NeighbourIndex.load``): FAISS's own binary index file (never
pickled) or the code index's CSR arrays, the indexed rows, ``config.json`` and ``meta.json`` (with the hashes of
what it indexes, which ``load`` can be asked to check).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from analysis.dense_index import DenseIndex
from analysis.stats import measure
from artifacts import SCHEMA_VERSION, ArtifactError, building, package_version, read_json, write_json, write_npy

METRICS = ("cosine", "l2")
DEVICES = ("cpu", "cuda")
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

    def csr(self, normalise: bool):
        """The codes as a ``scipy.sparse.csr_matrix`` ``(n, n_latents)``; rows scaled to unit norm when
        ``normalise``."""
        import scipy.sparse as sp  # loaded only when a matrix is asked for

        # A copy: scipy sorts a CSR matrix's arrays in place, which must never reach the caller's codes.
        values = np.array(self.values, dtype=np.float32)
        if normalise:
            norms = np.linalg.norm(values, axis=1, keepdims=True)
            values = values / np.where(norms > 0, norms, 1.0)
        n, k = values.shape
        indptr = np.arange(n + 1, dtype=np.int64) * k
        matrix = sp.csr_matrix((values.ravel(), np.asarray(self.indices, dtype=np.int64).ravel(), indptr),
                               shape=(n, self.n_latents))
        matrix.sum_duplicates()
        return matrix

    def dense(self) -> np.ndarray:
        """The dense codes ``(n, n_latents)`` float32 (only for small sets)."""
        return self.csr(normalise=False).toarray()


class NeighbourIndex:
    """Exact (or FAISS-approximate) nearest neighbours, in the scikit-learn habit.

    ``fit(data, rows=None)`` indexes ``data`` (an ``(n, d)`` array, memory map or space, or ``SparseCodes``),
    optionally only the given ``rows`` of it (e.g. the train split); ``search`` returns original row numbers.
    ``nprobe`` (IVF) and ``ef_search`` (HNSW) tune approximate FAISS indexes; ``device="cuda"`` moves a dense
    index to FAISS's GPU index (needs the FAISS GPU build and a GPU). In code space ``fast`` uses the compiled
    kernel of ``analysis.code_search``; ``fast=False`` is its plain reference twin. The fitted backend is
    ``backend_`` (``DenseIndex`` or ``CodeIndex``).
    """

    def __init__(self, metric: str = "cosine", factory: str = "Flat", batch_size: int = 1024, *,
                 nprobe: int | None = None, ef_search: int | None = None, device: str = "cpu", fast: bool = True):
        if metric not in METRICS:
            raise ValueError(f"--metric must be one of {METRICS}, got {metric!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        _check_knobs(nprobe, ef_search)
        if device not in DEVICES:
            raise ValueError(f"--device must be one of {DEVICES}, got {device!r}")
        self.metric, self.factory, self.batch_size = metric, factory, batch_size
        self.nprobe, self.ef_search, self.device, self.fast = nprobe, ef_search, device, fast

    # -- fitting ------------------------------------------------------------------------------------------
    def fit(self, data, rows=None, seed: int = 0) -> "NeighbourIndex":
        """Index ``data`` (or its ``rows``); ``seed`` draws the training sample of an index that needs one."""
        n_all = data.n if isinstance(data, SparseCodes) else len(data)
        self.rows_ = np.arange(n_all, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self.sparse_ = isinstance(data, SparseCodes)
        if self.sparse_:
            if self.metric != "cosine":
                raise ValueError("code-space search supports metric='cosine' only")
            from analysis.code_index import CodeIndex  # numba and the kernel load only for code space

            self.backend_ = CodeIndex(self.batch_size, self.fast).fit(data if rows is None else data.take(self.rows_))
        else:
            self.backend_ = DenseIndex(self.metric, self.factory, nprobe=self.nprobe, ef_search=self.ef_search,
                                       device=self.device).fit(data, None if rows is None else self.rows_, seed)
        self.n_, self.dim_ = int(self.rows_.size), int(self.backend_.dim_)
        return self

    @property
    def index_(self):
        """The FAISS index of a dense backend."""
        self._check_fitted()
        return self.backend_.index_

    @property
    def inverted_(self):
        """The inverted lists (CSR arrays ``(n_latents, n)``) of the code-space backend."""
        self._check_fitted()
        return self.backend_.inverted_

    def set_search_parameters(self, *, nprobe: int | None = None, ef_search: int | None = None) -> "NeighbourIndex":
        """Change ``nprobe`` (IVF) or ``ef_search`` (HNSW) of a fitted dense index without rebuilding it."""
        self._check_fitted()
        if self.sparse_:
            raise ValueError("the code-space index is exact; it has no search parameters")
        _check_knobs(nprobe, ef_search)
        self.nprobe = self.backend_.nprobe = self.nprobe if nprobe is None else nprobe
        self.ef_search = self.backend_.ef_search = self.ef_search if ef_search is None else ef_search
        self.backend_.apply_search_parameters()
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "backend_"):
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
        if not 1 <= n_neighbours <= self.n_ - n_extra:
            rows = "the indexed rows" if exclude is None else "the indexed rows but the query itself"
            raise ValueError(f"--n-neighbours must be in [1, {self.n_ - n_extra}] ({rows}), got {n_neighbours}")
        scores = np.empty((m, n_neighbours), dtype=np.float32)
        rows = np.empty((m, n_neighbours), dtype=np.int64)
        for start, stop in self.backend_.batches(queries, m, self.batch_size):
            batch = queries.take(np.arange(start, stop)) if self.sparse_ else np.asarray(queries[start:stop])
            s, pos = self.backend_.search(batch, n_neighbours + n_extra)
            drop = None if exclude is None else np.asarray(exclude[start:stop])[:, None]
            scores[start:stop], rows[start:stop] = _drop_excluded(s, self.rows_[pos], drop, n_neighbours)
        return scores, rows

    def vectors(self, rows) -> np.ndarray:
        """The indexed vectors of original ``rows`` as the dense index holds them (unit rows for cosine)."""
        self._check_fitted()
        if self.sparse_:
            raise ValueError("the code-space index holds inverted lists, not vectors; read the codes instead")
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        if not hasattr(self, "_rows_sorted"):  # checked once: the rows of a large index take a while to scan
            self._rows_sorted = bool(np.all(np.diff(self.rows_) >= 0))
        positions = np.minimum(np.searchsorted(self.rows_, rows), self.n_ - 1)
        if not self._rows_sorted or not np.array_equal(self.rows_[positions], rows):
            raise ValueError("vectors(rows) needs rows that the index holds (in an index of sorted rows)")
        return self.backend_.vectors(positions)

    # -- persistence --------------------------------------------------------------------------------------
    def save(self, index_dir: str | os.PathLike, *, parents: dict | None = None, overwrite: bool = False,
             records: dict | None = None) -> Path:
        """Write the fitted index to ``index_dir`` atomically. ``parents``: the hashes of what it indexes (e.g.
        the store's content hash); ``records``: more JSON files to keep with it, by name (``{"quality": {...}}``
        is written as ``quality.json``)."""
        self._check_fitted()
        with building(index_dir, overwrite) as work:
            write_npy(work / "rows.npy", self.rows_)
            self.backend_.save(work)
            write_json(work / "config.json", {"metric": self.metric, "factory": self.factory,
                                              "batch_size": self.batch_size, "nprobe": self.nprobe,
                                              "ef_search": self.ef_search, "sparse": self.sparse_,
                                              "has_negative": getattr(self.backend_, "has_negative_", None)})
            for name, record in (records or {}).items():
                write_json(work / f"{name}.json", record)
            write_json(work / "meta.json", {"kind": "neighbour_index", "schema_version": SCHEMA_VERSION,
                                            "package_version": package_version(), "n": self.n_, "dim": self.dim_,
                                            "parents": parents or {}})
        return Path(index_dir)

    @classmethod
    def load(cls, index_dir: str | os.PathLike, device: str = "cpu", *, mmap: bool = False,
             parents: dict | None = None) -> "NeighbourIndex":
        """A fitted index from a directory written by ``save``; ``mmap`` maps its arrays instead of reading them.
        With ``parents``, an index built from anything else (its recorded parents differ) is refused."""
        index_dir = Path(index_dir)
        meta = read_json(index_dir / "meta.json")
        if meta.get("kind") != "neighbour_index":
            raise ArtifactError(f"{index_dir} is not a saved neighbour index (meta kind {meta.get('kind')!r})")
        if parents is not None and meta.get("parents") != parents:
            stale = sorted(k for k in set(parents) | set(meta.get("parents") or {})
                           if parents.get(k) != (meta.get("parents") or {}).get(k))
            raise ArtifactError(f"the neighbour index {index_dir} was built from other data ({', '.join(stale)} "
                                f"differ): it is stale; delete {index_dir} and it is rebuilt on the next query")
        cfg = read_json(index_dir / "config.json")
        self = cls(cfg["metric"], cfg["factory"], cfg["batch_size"], nprobe=cfg["nprobe"],
                   ef_search=cfg["ef_search"], device=device)
        self.rows_ = np.load(index_dir / "rows.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
        self.n_, self.dim_, self.sparse_ = int(meta["n"]), int(meta["dim"]), bool(cfg["sparse"])
        if self.sparse_:
            from analysis.code_index import CodeIndex

            self.backend_ = CodeIndex.load(index_dir, cfg, self.dim_, self.n_, mmap=mmap)
        else:
            self.backend_ = DenseIndex.load(index_dir, cfg, self.dim_, device=device, mmap=mmap)
        return self


def _check_knobs(nprobe: int | None, ef_search: int | None) -> None:
    for name, value in (("--nprobe", nprobe), ("--ef-search", ef_search)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


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


def _drop_excluded(scores, rows, drop, n_neighbours: int):
    if drop is None:
        return scores[:, :n_neighbours], rows[:, :n_neighbours]
    keep = rows != drop
    # Keep the first n_neighbours of each row that are not excluded (each query excludes at most one row).
    order = np.argsort(~keep, axis=1, kind="stable")[:, :n_neighbours]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
