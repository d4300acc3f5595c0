"""CodeStore: the sparse codes of a whole data set, memory-mapped, with inverted lists per latent.

Layout (schema ``artifacts.SCHEMA_VERSION``)::

    CODES_DIR/
      indices.npy      (n, k) int32   latent indices of each row, sorted by value descending
      values.npy       (n, k) float32 code values (>= 0 for "topk"; may be negative for "paper")
      inv_indptr.npy   (n_latents + 1,) int64   CSR pointers of the inverted lists
      inv_rows.npy     (n * k,) int64           rows where each latent is selected, ascending per latent
      latent_frequency.npy (n_latents,) float64 fraction of rows on which each latent fires (value > 0)
      config.json      the SAE config and the encoding settings
      meta.json        schema and package version, parents (SAE and store hashes), n, k, n_latents,
                       firing-frequency summary
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap

from artifacts import (
    SCHEMA_VERSION, ArtifactError, building, package_version, read_json, write_json,
)
from sae.checkpoint import check_compatible
from sae.metrics import code_metrics, iter_batches
from sae.model import TopKSAE

CODE_FILES = ("indices.npy", "values.npy", "inv_indptr.npy", "inv_rows.npy")
MAX_BAD_ROWS_NAMED = 20


@dataclass(frozen=True)
class CodeStore:
    """A read-only view of a complete codes directory; arrays are memory-mapped."""

    codes_dir: Path
    """The codes directory."""
    indices: np.ndarray
    """Latent indices ``(n, k)`` int32, each row sorted by value descending."""
    values: np.ndarray
    """Code values ``(n, k)`` float32."""
    inv_indptr: np.ndarray
    """CSR pointers ``(n_latents + 1,)`` of the inverted lists."""
    inv_rows: np.ndarray
    """Rows ``(n * k,)`` where each latent is selected, ascending within each latent."""
    meta: dict = field(repr=False)
    """The directory's ``meta.json``."""
    config: dict = field(repr=False)
    """The directory's ``config.json``."""

    @classmethod
    def open(cls, codes_dir: str | os.PathLike) -> "CodeStore":
        codes_dir = Path(codes_dir)
        if not codes_dir.is_dir():
            raise ArtifactError(f"codes directory {codes_dir} does not exist; create it with scripts/encode.py")
        for name in CODE_FILES:
            if not (codes_dir / name).is_file():
                raise ArtifactError(f"{codes_dir / name} is missing; re-run scripts/encode.py with --overwrite")
        arrays = {name: np.load(codes_dir / name, mmap_mode="r") for name in CODE_FILES}
        store = cls(
            codes_dir=codes_dir,
            indices=arrays["indices.npy"],
            values=arrays["values.npy"],
            inv_indptr=arrays["inv_indptr.npy"],
            inv_rows=arrays["inv_rows.npy"],
            meta=read_json(codes_dir / "meta.json"),
            config=read_json(codes_dir / "config.json"),
        )
        n, k = store.indices.shape
        if store.values.shape != (n, k) or store.inv_rows.shape != (n * k,) or store.inv_indptr[-1] != n * k:
            raise ArtifactError(f"{codes_dir}: array shapes are inconsistent; re-run scripts/encode.py with --overwrite")
        return store

    @property
    def n(self) -> int:
        return int(self.indices.shape[0])

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])

    @property
    def n_latents(self) -> int:
        return int(self.inv_indptr.shape[0] - 1)

    def rows_of(self, latent: int) -> np.ndarray:
        """Rows (ascending) whose code selects ``latent``."""
        if not 0 <= latent < self.n_latents:
            raise IndexError(f"latent {latent} out of range [0, {self.n_latents})")
        return np.asarray(self.inv_rows[self.inv_indptr[latent] : self.inv_indptr[latent + 1]])

    def codes(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """``(values, indices)`` of the given rows, as in-memory arrays."""
        rows = np.asarray(rows)
        return np.asarray(self.values[rows]), np.asarray(self.indices[rows])

    def dense(self, rows) -> np.ndarray:
        """The dense codes ``(len(rows), n_latents)`` float32 of the given rows."""
        values, indices = self.codes(np.atleast_1d(rows))
        out = np.zeros((values.shape[0], self.n_latents), dtype=np.float32)
        np.put_along_axis(out, indices.astype(np.int64), values, axis=1)
        return out

    def counts(self) -> np.ndarray:
        """How many rows select each latent, ``(n_latents,)``."""
        return np.diff(np.asarray(self.inv_indptr))


@torch.no_grad()
def encode_array(
    model: TopKSAE,
    x,
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 4096,
    parents: dict | None = None,
    overwrite: bool = False,
    device: str | torch.device | None = None,
) -> CodeStore:
    """Encode every row of ``x (n, d)`` (array-like, e.g. a memmap) into a CodeStore at ``out_dir``.

    Written in batches into memory-mapped files in a partial directory and committed atomically; memory
    stays bounded by the batch size plus the ``(n_latents,)`` counters. ``parents`` (e.g. ``sae_dir``,
    ``sae_hash``, ``store_dir``, ``store_hash``) is recorded in ``meta.json``. Rows with NaN or Inf are an
    error naming them.
    """
    if len(x.shape) != 2:
        raise ValueError(f"encode_array takes an (n, d) array, got shape {tuple(x.shape)}")
    n, d = int(x.shape[0]), int(x.shape[1])
    store_dir = (parents or {}).get("store_dir")
    check_compatible(model, d, f"store {store_dir}" if store_dir is not None else "the input array")
    if device is None:
        device = next(model.parameters()).device
    k, n_latents = model.config.k, model.config.n_latents
    # Committed when the block ends; an error deletes the partial directory and releases the lock of out_dir.
    with building(out_dir, overwrite) as work:
        indices = open_memmap(work / "indices.npy", mode="w+", dtype=np.int32, shape=(n, k))
        values = open_memmap(work / "values.npy", mode="w+", dtype=np.float32, shape=(n, k))
        counts = np.zeros(n_latents, dtype=np.int64)
        fired = np.zeros(n_latents, dtype=np.int64)  # selected with value > 0 (counts includes zero values)
        bad_rows: list[int] = []
        n_bad = 0
        was_training = model.training
        model.eval()
        try:
            for start, xb in iter_batches(x, batch_size, device):
                finite = torch.isfinite(xb).all(1)
                if not bool(finite.all()):
                    bad = (torch.nonzero(~finite).squeeze(1) + start).tolist()
                    n_bad += len(bad)
                    bad_rows.extend(bad[: MAX_BAD_ROWS_NAMED - len(bad_rows)])
                    xb = torch.where(finite[:, None], xb, torch.zeros_like(xb))
                if n_bad:
                    continue  # keep scanning to report every bad row, but stop encoding
                v, i = model.encode(xb)
                i_np = i.cpu().numpy()
                values[start : start + len(i_np)] = v.float().cpu().numpy()
                indices[start : start + len(i_np)] = i_np
                counts += np.bincount(i_np.ravel(), minlength=n_latents)
                fired += np.bincount(i_np[(v > 0).cpu().numpy()], minlength=n_latents)
        finally:
            model.train(was_training)
        if n_bad:
            more = f" (first {len(bad_rows)} shown)" if n_bad > len(bad_rows) else ""
            raise ArtifactError(
                f"{n_bad} input rows contain NaN or Inf{more}: rows {bad_rows}. Fix or drop them in the store "
                "before encoding."
            )
        indptr = np.zeros(n_latents + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        inv_rows = open_memmap(work / "inv_rows.npy", mode="w+", dtype=np.int64, shape=(n * k,))
        _fill_inverted_lists(indices, indptr, inv_rows, batch_size)
        np.save(work / "inv_indptr.npy", indptr, allow_pickle=False)
        np.save(work / "latent_frequency.npy", fired / max(n, 1), allow_pickle=False)
        summary = code_metrics(values, indices, n_latents) if n else {}
        indices.flush(), values.flush(), inv_rows.flush()
        del indices, values, inv_rows
        write_json(work / "config.json", {"sae": model.config.to_dict(), "batch_size": batch_size})
        write_json(
            work / "meta.json",
            {
                "kind": "codes",
                "schema_version": SCHEMA_VERSION,
                "package_version": package_version(),
                "parents": {key: (str(v) if isinstance(v, os.PathLike) else v) for key, v in (parents or {}).items()},
                "sae_hash": (parents or {}).get("sae_hash"),
                "store_hash": (parents or {}).get("store_hash"),
                "n": n,
                "k": k,
                "n_latents": n_latents,
                "firing": {key: summary[key] for key in ("l0", "n_dead", "dead_fraction", "n_dense", "dense_fraction", "freq_hist")}
                if summary
                else {},
            },
        )
    return CodeStore.open(out_dir)


def _fill_inverted_lists(indices: np.ndarray, indptr: np.ndarray, inv_rows: np.ndarray, batch_size: int) -> None:
    """Place every row under each latent it selects, batch by batch; rows stay ascending per latent."""
    n, k = indices.shape
    cursor = indptr[:-1].copy()
    for start in range(0, n, batch_size):
        lat = np.asarray(indices[start : start + batch_size], dtype=np.int64).ravel()
        rows = np.repeat(np.arange(start, start + len(lat) // k, dtype=np.int64), k)
        order = np.argsort(lat, kind="stable")  # stable: rows ascending within each latent
        lat_s, rows_s = lat[order], rows[order]
        first = np.searchsorted(lat_s, lat_s, side="left")  # position of each latent's first entry
        rank = np.arange(len(lat_s)) - first
        inv_rows[cursor[lat_s] + rank] = rows_s
        cursor += np.bincount(lat_s, minlength=len(cursor))
