"""The paper's three spaces, rows on demand: embeddings Ψ, reconstructions Ψ̂ = decode(encode(x)), codes Φ̂.

Each space gives the vectors of any rows, dense and batched, without materialising what does not fit: at
ImageNet scale the dense codes would be 1.28M × 4096 floats (21 GB), so the code space also gives its rows as
``SparseCodes`` and the whole CodeStore as one ``SparseCodes`` over its memory maps (``all_codes``), which
code-space search uses instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from analysis.neighbours import SparseCodes
from embeddings.store import EmbeddingStore
from sae.codes import CodeStore

if TYPE_CHECKING:  # torch and the SAE load only for the reconstructions space
    from sae.model import TopKSAE

SPACE_NAMES = ("embeddings", "reconstructions", "codes")
BATCH_ROWS = 8192
"""Rows computed at a time when a space's vectors are derived (reconstructions, dense codes)."""


@dataclass(frozen=True)
class Space:
    """One of the three spaces: ``rows(rows)`` gives dense float32 vectors ``(len, dim)``."""

    name: str
    """``embeddings``, ``reconstructions`` or ``codes``."""
    n: int
    """Number of rows."""
    dim: int
    """Width of a vector."""
    _rows: Callable[[np.ndarray], np.ndarray]
    _codes: CodeStore | None = None

    def rows(self, rows=None) -> np.ndarray:
        """Dense vectors of ``rows`` (all rows when ``None``), ``(len(rows), dim)`` float32, built in batches."""
        rows = np.arange(self.n) if rows is None else np.atleast_1d(np.asarray(rows, dtype=np.int64))
        if rows.size and (rows.min() < 0 or rows.max() >= self.n):
            raise IndexError(f"rows out of range [0, {self.n}) in the {self.name} space")
        out = np.empty((rows.size, self.dim), dtype=np.float32)
        for start in range(0, rows.size, BATCH_ROWS):
            out[start : start + BATCH_ROWS] = self._rows(rows[start : start + BATCH_ROWS])
        return out

    def sparse(self, rows=None) -> SparseCodes:
        """The codes of ``rows`` (all rows, memory-mapped, when ``None``): the code space only."""
        if self._codes is None:
            raise ValueError(f"the {self.name} space is dense; only the codes space has sparse rows")
        codes = all_codes(self._codes)
        return codes if rows is None else codes.take(np.atleast_1d(np.asarray(rows, dtype=np.int64)))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, rows) -> np.ndarray:
        """``space[rows]`` is ``space.rows(rows)``: a space can be fitted like an array (``NeighbourIndex.fit``)."""
        return self.rows(rows)

    @property
    def is_sparse(self) -> bool:
        return self._codes is not None

    def index_data(self):
        """What ``NeighbourIndex.fit`` takes for this space: all codes as ``SparseCodes``, else a dense array
        (the store's memory map for embeddings, computed in batches for reconstructions)."""
        return self.sparse() if self.is_sparse else self.rows()

    def queries(self, rows) -> np.ndarray | SparseCodes:
        """What ``NeighbourIndex.search`` takes for ``rows`` of this space."""
        return self.sparse(rows) if self.is_sparse else self.rows(rows)


def all_codes(codes: CodeStore) -> SparseCodes:
    """Every row of a CodeStore as ``SparseCodes`` over its memory maps: no copy, never dense."""
    return SparseCodes(codes.values, codes.indices, codes.n_latents)


def codes_from_arrays(values: np.ndarray, indices: np.ndarray, n_latents: int, meta: dict | None = None) -> CodeStore:
    """An in-memory CodeStore (no directory) of ``values``/``indices (n, k)``, with its inverted lists."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    indices = np.ascontiguousarray(indices, dtype=np.int32)
    if values.shape != indices.shape or values.ndim != 2:
        raise ValueError(f"codes values {values.shape} and indices {indices.shape} must be equal (n, k)")
    flat = indices.ravel().astype(np.int64)
    order = np.argsort(flat, kind="stable")  # stable: rows ascending within each latent
    indptr = np.zeros(n_latents + 1, dtype=np.int64)
    np.cumsum(np.bincount(flat, minlength=n_latents), out=indptr[1:])
    return CodeStore(codes_dir=Path("<in memory>"), indices=indices, values=values, inv_indptr=indptr,
                     inv_rows=order // max(indices.shape[1], 1), meta=meta or {}, config={})


def embedding_space(store: EmbeddingStore) -> Space:
    """Ψ: the store's embeddings."""
    def rows_of(rows: np.ndarray) -> np.ndarray:
        # A memory map reads sorted rows sequentially; the result is put back in the order asked for.
        order = np.argsort(rows)
        out = np.empty((rows.size, store.d), dtype=np.float32)
        out[order] = store.x[rows[order]]
        return out

    return Space("embeddings", store.n, store.d, rows_of)


def reconstruction_space(store: EmbeddingStore, sae: TopKSAE) -> Space:
    """Ψ̂ = decode(encode(x)) of the store's embeddings, computed on demand."""
    import torch

    from sae.checkpoint import check_compatible

    check_compatible(sae, store.d, f"store {store.store_dir}")
    base = embedding_space(store)

    @torch.no_grad()
    def rows_of(rows: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(base.rows(rows)).to(next(sae.parameters()).device)
        values, indices = sae.encode(x)
        return sae.decode(values, indices).float().cpu().numpy()

    return Space("reconstructions", store.n, store.d, rows_of)


def code_space(codes: CodeStore) -> Space:
    """Φ̂: the sparse codes; dense rows on demand (small sets only), sparse rows for search."""
    return Space("codes", codes.n, codes.n_latents, lambda rows: codes.dense(rows), codes)


def make_space(name: str, store: EmbeddingStore, sae: TopKSAE | None, codes: CodeStore | None) -> Space:
    """The space called ``name`` (``--space``) from what is at hand."""
    if name == "embeddings":
        return embedding_space(store)
    if name == "reconstructions":
        if sae is None:
            raise ValueError("--space reconstructions needs an SAE (--sae)")
        return reconstruction_space(store, sae)
    if name == "codes":
        if codes is None:
            raise ValueError("--space codes needs the codes (--codes)")
        return code_space(codes)
    raise ValueError(f"--space must be one of {SPACE_NAMES}, got {name!r}")
