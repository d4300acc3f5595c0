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

import functools
from typing import TYPE_CHECKING

import numpy as np

from artifacts import (
    SCHEMA_VERSION, ArtifactError, building, check_npy, create_npy, package_version, read_json, write_json, write_npy,
)

if TYPE_CHECKING:  # reading codes needs numpy alone: torch and the model load only to encode (encode_array)
    import torch

    from sae.model import TopKSAE

CODE_FILES = ("indices.npy", "values.npy", "inv_indptr.npy", "inv_rows.npy")
CODE_DTYPE_KINDS = {"indices.npy": ("iu", 2), "values.npy": ("f", 2), "inv_indptr.npy": ("iu", 1),
                    "inv_rows.npy": ("iu", 1)}
"""What each file must hold: numpy dtype kinds and number of dimensions."""
MAX_BAD_ROWS_NAMED = 20
RANGE_BLOCK = 1 << 22
"""Entries scanned at a time when checking that indices lie in range (bounded memory on any size)."""


def _reencode_hint(codes_dir: Path, meta: dict | None = None) -> str:
    parents = (meta or {}).get("parents") if isinstance((meta or {}).get("parents"), dict) else {}
    store, sae = parents.get("store_dir", "STORE_DIR"), parents.get("sae_dir", "SAE_DIR")
    return f"re-encode: `python scripts/encode.py --store {store} --sae {sae} --out {codes_dir} --overwrite`"


def _check_range(path: Path, a: np.ndarray, high: int, what: str, hint: str) -> None:
    """Refuse ``a`` (any shape, memory-mapped) unless every entry is in ``[0, high)``; scanned in blocks."""
    flat = a.reshape(-1)
    for start in range(0, flat.size, RANGE_BLOCK):
        block = np.asarray(flat[start : start + RANGE_BLOCK])
        low, top = int(block.min()), int(block.max())
        if low < 0 or top >= high:
            bad = low if low < 0 else top
            at = start + int(np.argmax(block == bad))
            raise ArtifactError(f"{path} holds {what} {bad} at entry {at}, outside 0..{high - 1}; {hint}")


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
        """Open a complete codes directory; a missing, damaged or inconsistent file raises ``ArtifactError``
        naming it: sizes against the ``.npy`` headers, dtypes, shapes, the inverted lists' pointers, and every
        latent index in ``[0, n_latents)`` and row in ``[0, n)`` (scanned in blocks)."""
        codes_dir = Path(codes_dir)
        if not codes_dir.is_dir():
            raise ArtifactError(f"codes directory {codes_dir} does not exist; create it with scripts/encode.py")
        hint = _reencode_hint(codes_dir)
        meta = read_json(codes_dir / "meta.json", expect=dict, hint=hint)
        hint = _reencode_hint(codes_dir, meta)
        config = read_json(codes_dir / "config.json", expect=dict, hint=hint)
        arrays = {}
        for name in CODE_FILES:
            if not (codes_dir / name).is_file():
                raise ArtifactError(f"{codes_dir / name} is missing; {hint}")
            kinds, ndim = CODE_DTYPE_KINDS[name]
            check_npy(codes_dir / name, hint, kinds=kinds, ndim=ndim)
            arrays[name] = np.load(codes_dir / name, mmap_mode="r", allow_pickle=False)
        store = cls(codes_dir=codes_dir, indices=arrays["indices.npy"], values=arrays["values.npy"],
                    inv_indptr=arrays["inv_indptr.npy"], inv_rows=arrays["inv_rows.npy"], meta=meta, config=config)
        store._check_consistent(hint)
        return store

    def _check_consistent(self, hint: str) -> None:
        n, k = self.indices.shape
        d = self.codes_dir
        if self.values.shape != (n, k) or self.inv_rows.shape != (n * k,):
            raise ArtifactError(f"{d / 'indices.npy'} {self.indices.shape}, {d / 'values.npy'} {self.values.shape} and "
                                f"{d / 'inv_rows.npy'} {self.inv_rows.shape} do not fit together; {hint}")
        indptr = np.asarray(self.inv_indptr)
        if indptr.size < 2 or indptr[0] != 0 or indptr[-1] != n * k or (np.diff(indptr) < 0).any():
            raise ArtifactError(f"{d / 'inv_indptr.npy'} is not the pointer array of {n * k} entries (it must start "
                                f"at 0, never decrease and end at {n * k}); {hint}")
        recorded = {key: self.meta.get(key) for key in ("n", "k", "n_latents")}
        actual = {"n": n, "k": k, "n_latents": self.n_latents}
        diffs = [f"{key}={recorded[key]}" for key in actual
                 if recorded[key] is not None and recorded[key] != actual[key]]
        if diffs:
            raise ArtifactError(f"{d / 'meta.json'} says {', '.join(diffs)} but the arrays hold n={n}, k={k}, "
                                f"n_latents={self.n_latents}; {hint}")
        _check_range(d / "indices.npy", self.indices, self.n_latents, "latent index", hint)
        _check_range(d / "inv_rows.npy", self.inv_rows, n, "row", hint)

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


def _no_grad(fn):
    """``torch.no_grad()`` for ``fn``, importing torch only when ``fn`` runs."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return run


@_no_grad
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
    from sae.checkpoint import check_compatible
    from sae.metrics import code_metrics

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
        # Reserved on disk before any write: a memory-mapped write to a full disk would kill the process (SIGBUS).
        indices = create_npy(work / "indices.npy", np.int32, (n, k), "encoding the codes")
        values = create_npy(work / "values.npy", np.float32, (n, k), "encoding the codes")
        what = f"store {store_dir} (embeddings.npy)" if store_dir is not None else "the input array"
        counts, fired = _encode_into(model, x, batch_size, device, indices, values, what)
        indptr = np.zeros(n_latents + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        inv_rows = create_npy(work / "inv_rows.npy", np.int64, (n * k,), "building the inverted lists")
        _fill_inverted_lists(indices, indptr, inv_rows, batch_size)
        write_npy(work / "inv_indptr.npy", indptr)
        write_npy(work / "latent_frequency.npy", fired / max(n, 1))
        summary = code_metrics(values, indices, n_latents) if n else {}
        indices.flush(), values.flush(), inv_rows.flush()
        del indices, values, inv_rows
        write_json(work / "config.json", {"sae": model.config.to_dict(), "batch_size": batch_size})
        write_json(work / "meta.json", _meta(parents or {}, n, k, n_latents, summary))
    return CodeStore.open(out_dir)


def _meta(parents: dict, n: int, k: int, n_latents: int, summary: dict) -> dict:
    """The ``meta.json`` of a codes directory: versions, parents, sizes and the firing summary."""
    firing_keys = ("l0", "n_dead", "dead_fraction", "n_dense", "dense_fraction", "freq_hist")
    return {
        "kind": "codes",
        "schema_version": SCHEMA_VERSION,
        "package_version": package_version(),
        "parents": {key: (str(v) if isinstance(v, os.PathLike) else v) for key, v in parents.items()},
        "sae_hash": parents.get("sae_hash"),
        "store_hash": parents.get("store_hash"),
        "n": n,
        "k": k,
        "n_latents": n_latents,
        "firing": {key: summary[key] for key in firing_keys} if summary else {},
    }


def _encode_into(model: TopKSAE, x, batch_size: int, device, indices: np.ndarray, values: np.ndarray,
                 what: str) -> tuple[np.ndarray, np.ndarray]:
    """Encode ``x`` batch by batch into ``indices`` and ``values``; returns how often each latent is selected and
    how often with a value > 0. Rows with NaN or Inf are an error naming ``what`` and the rows (all are scanned)."""
    import torch

    from sae.metrics import iter_batches

    n_latents = model.config.n_latents
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
            f"{n_bad} input rows of {what} contain NaN or Inf{more}: rows {bad_rows}. Fix or drop them (for a "
            "store: extract it again with scripts/extract.py --overwrite) before encoding."
        )
    return counts, fired


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
