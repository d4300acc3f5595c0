"""EmbeddingStore: the on-disk directory of frozen backbone embeddings.

Layout (schema ``artifacts.SCHEMA_VERSION``)::

    STORE_DIR/
      embeddings.npy   (n, d) float32 or float16, memory-mapped on open
      labels.npy       (n,) int64, -1 where an image has no label
      ids.json         n strings: relative paths, or dataset indices for built-in data sets
      classes.json     class names, index = label (empty when unlabelled)
      split.npz        int64 row indices named train / val / test (a row is in at most one)
      skipped.json     [{"id": ..., "reason": ...}] inputs that could not be read
      config.json      the ExtractConfig that produced the store
      meta.json        schema and package version, backbone, weights source and SHA-256,
                       preprocessing, output kind, normalisation, dtype, n, d, content hash, timings
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from artifacts import (
    SCHEMA_VERSION,
    ArtifactError,
    atomic_file,
    begin_dir,
    commit_dir,
    package_version,
    read_json,
    sha256_file,
    write_json,
    write_npy,
)

STORE_FILES = ("embeddings.npy", "labels.npy", "ids.json", "classes.json", "split.npz", "skipped.json")
SPLIT_NAMES = ("train", "val", "test")


def content_hash(store_dir: str | os.PathLike) -> str:
    """SHA-256 over the store's data files (not its meta), identifying its content for child artifacts."""
    store_dir = Path(store_dir)
    h = hashlib.sha256()
    for name in STORE_FILES:
        h.update(name.encode())
        h.update(sha256_file(store_dir / name).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class EmbeddingStore:
    """A read-only view of a complete store directory; ``x`` is memory-mapped, never loaded whole."""

    store_dir: Path
    """The store directory."""
    x: np.ndarray
    """Embeddings ``(n, d)``, a read-only memory map."""
    labels: np.ndarray
    """Labels ``(n,)`` int64, -1 where unknown."""
    ids: list[str]
    """Image ids, one per row."""
    classes: list[str]
    """Class names, indexed by label."""
    split: dict[str, np.ndarray]
    """Row indices of each split present (``train``, ``val``, ``test``)."""
    skipped: list[dict]
    """Inputs that were skipped during extraction, with their reason."""
    meta: dict = field(repr=False)
    """The store's ``meta.json``."""
    config: dict = field(repr=False)
    """The store's ``config.json``."""

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    @property
    def d(self) -> int:
        return int(self.x.shape[1])

    @property
    def content_hash(self) -> str:
        return self.meta["content_hash"]

    def split_x(self, name: str) -> np.ndarray:
        """Embeddings of one split, ``(n_split, d)`` (a copy in memory)."""
        if name not in self.split:
            raise ArtifactError(f"store {self.store_dir} has no {name!r} split (it has {sorted(self.split)})")
        return np.asarray(self.x[self.split[name]])

    @classmethod
    def open(cls, store_dir: str | os.PathLike) -> "EmbeddingStore":
        """Open a complete store; a missing, partial or newer-schema directory raises ``ArtifactError``."""
        store_dir = Path(store_dir)
        if not store_dir.is_dir():
            raise ArtifactError(
                f"no embedding store at {store_dir}; create one with `python scripts/extract.py --out {store_dir}`"
            )
        meta = read_json(store_dir / "meta.json")
        if meta.get("schema_version", 0) > SCHEMA_VERSION:
            raise ArtifactError(
                f"store {store_dir} has schema {meta.get('schema_version')}, newer than this toolkit's "
                f"{SCHEMA_VERSION}; upgrade the package"
            )
        for name in STORE_FILES:
            if not (store_dir / name).is_file():
                raise ArtifactError(f"store {store_dir} is incomplete: {name} is missing; extract it again")
        x = np.load(store_dir / "embeddings.npy", mmap_mode="r", allow_pickle=False)
        labels = np.load(store_dir / "labels.npy", allow_pickle=False)
        ids = read_json(store_dir / "ids.json")
        if x.ndim != 2 or labels.shape != (x.shape[0],) or len(ids) != x.shape[0]:
            raise ArtifactError(
                f"store {store_dir} is inconsistent: embeddings {x.shape}, labels {labels.shape}, "
                f"{len(ids)} ids; extract it again"
            )
        with np.load(store_dir / "split.npz", allow_pickle=False) as z:
            split = {k: z[k] for k in z.files}
        return cls(
            store_dir=store_dir,
            x=x,
            labels=labels,
            ids=ids,
            classes=read_json(store_dir / "classes.json"),
            split=split,
            skipped=read_json(store_dir / "skipped.json"),
            meta=meta,
            config=read_json(store_dir / "config.json"),
        )


def finish_store(
    work_dir: str | os.PathLike,
    *,
    labels: np.ndarray,
    ids: list[str],
    classes: list[str],
    split: dict[str, np.ndarray],
    skipped: list[dict],
    config: dict,
    meta: dict,
) -> dict:
    """Write every file but ``embeddings.npy`` (already in ``work_dir``) and a ``meta.json`` whose
    ``n``, ``d``, ``dtype``, ``content_hash`` and versions are filled in from the data. Returns the meta."""
    work_dir = Path(work_dir)
    x = np.load(work_dir / "embeddings.npy", mmap_mode="r", allow_pickle=False)
    n = x.shape[0]
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (n,) or len(ids) != n:
        raise ValueError(f"store needs one label and one id per row: {n} rows, {labels.shape} labels, {len(ids)} ids")
    unknown = set(split) - set(SPLIT_NAMES)
    if unknown:
        raise ValueError(f"unknown split names {sorted(unknown)}; use {SPLIT_NAMES}")
    split = {k: np.asarray(v, dtype=np.int64) for k, v in split.items()}
    for name, rows in split.items():
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise ValueError(f"split {name!r} has row indices outside [0, {n})")
    write_npy(work_dir / "labels.npy", labels)
    write_json(work_dir / "ids.json", list(ids))
    write_json(work_dir / "classes.json", list(classes))
    with atomic_file(work_dir / "split.npz") as f:
        np.savez(f, **split)
    write_json(work_dir / "skipped.json", list(skipped))
    write_json(work_dir / "config.json", config)
    meta = {
        **meta,
        "schema_version": SCHEMA_VERSION,
        "package_version": package_version(),
        "n": int(n),
        "d": int(x.shape[1]),
        "dtype": str(x.dtype),
        "n_skipped": len(skipped),
        "content_hash": content_hash(work_dir),
    }
    write_json(work_dir / "meta.json", meta)
    return meta


def write_store(
    store_dir: str | os.PathLike,
    x: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    ids: list[str] | None = None,
    classes: list[str] | None = None,
    split: dict[str, np.ndarray] | None = None,
    skipped: list[dict] | None = None,
    config: dict | None = None,
    meta: dict | None = None,
    overwrite: bool = False,
) -> EmbeddingStore:
    """Write an in-memory ``(n, d)`` array as a complete store, atomically, and open it.

    For arrays that already exist (tests, small data sets, imports); extraction streams rows instead.
    """
    x = np.asarray(x)
    if x.ndim != 2 or x.dtype not in (np.float32, np.float16):
        raise ValueError(f"embeddings must be a 2-d float32 or float16 array, got {x.dtype} {x.shape}")
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise ValueError(f"embeddings hold NaN or Inf in rows {bad[:10].tolist()}")
    n = x.shape[0]
    work = begin_dir(store_dir, overwrite)
    write_npy(work / "embeddings.npy", x)
    finish_store(
        work,
        labels=np.full(n, -1, dtype=np.int64) if labels is None else labels,
        ids=[str(i) for i in range(n)] if ids is None else ids,
        classes=[] if classes is None else classes,
        split={} if split is None else split,
        skipped=[] if skipped is None else skipped,
        config={} if config is None else config,
        meta={} if meta is None else meta,
    )
    commit_dir(work, store_dir, overwrite=overwrite)
    return EmbeddingStore.open(store_dir)
