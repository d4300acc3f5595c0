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
                       preprocessing, output kind, normalisation, dtype, n, d, content hash (and the SHA-256
                       of each data file), timings

Opening checks what is cheap (``embeddings.store_files``: file sizes against the ``.npy`` headers, the type of
every JSON file, labels against the classes, split rows against ``n``; ``n``, ``d``, dtype of ``meta.json`` against
the arrays); ``EmbeddingStore.verify`` rehashes every file against ``meta.json`` and scans the embeddings for NaN
and Inf.
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
    building,
    package_version,
    read_json,
    sha256_file,
    write_json,
    write_npy,
)
from embeddings.store_files import (
    SPLIT_NAMES,
    read_embeddings,
    read_labels,
    read_meta,
    read_split,
    read_strings,
    rebuild_hint,
)

STORE_FILES = ("embeddings.npy", "labels.npy", "ids.json", "classes.json", "split.npz", "skipped.json")
FINITE_BLOCK_ROWS = 1 << 16
"""Rows scanned at a time for NaN and Inf (bounded memory on stores larger than memory)."""


def file_hashes(store_dir: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of each of the store's data files, by name."""
    return {name: sha256_file(Path(store_dir) / name) for name in STORE_FILES}


def content_hash(store_dir: str | os.PathLike, hashes: dict[str, str] | None = None) -> str:
    """SHA-256 over the store's data files (not its meta), identifying its content for child artifacts."""
    hashes = file_hashes(store_dir) if hashes is None else hashes
    h = hashlib.sha256()
    for name in STORE_FILES:
        h.update(name.encode())
        h.update(hashes[name].encode())
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

    def verify(self) -> None:
        """Recompute the SHA-256 of every data file and refuse, naming the file, a store whose files or
        ``meta.json`` changed after extraction. Reads every byte: stages that record the store as a parent call
        it (``verify_store``); ``--no-verify`` skips it on stores too large to hash each time."""
        hashes = file_hashes(self.store_dir)
        recorded = self.meta.get("file_sha256")
        if isinstance(recorded, dict):
            for name in STORE_FILES:
                if recorded.get(name) != hashes[name]:
                    raise ArtifactError(
                        f"{self.store_dir / name} does not match the SHA-256 recorded in "
                        f"{self.store_dir / 'meta.json'}: it changed or was damaged after extraction; "
                        f"{rebuild_hint(self.store_dir)}"
                    )
        actual = content_hash(self.store_dir, hashes)
        if self.meta.get("content_hash") != actual:
            raise ArtifactError(
                f"{self.store_dir / 'meta.json'} records content_hash {str(self.meta.get('content_hash'))[:16]}... but "
                f"the store's files hash to {actual[:16]}...: meta.json or the data was edited or damaged; "
                f"{rebuild_hint(self.store_dir)}"
            )
        self.check_finite()

    def check_finite(self, rows=None) -> None:
        """Refuse, naming the store and the rows, embeddings that hold NaN or Inf (all rows, or ``rows``); reads
        them in blocks of ``FINITE_BLOCK_ROWS``."""
        rows = np.arange(self.n) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        bad: list[int] = []
        n_bad = 0
        for start in range(0, rows.size, FINITE_BLOCK_ROWS):
            block = rows[start : start + FINITE_BLOCK_ROWS]
            ok = np.isfinite(np.asarray(self.x[block])).all(axis=1)
            n_bad += int((~ok).sum())
            bad += block[~ok][: 10 - len(bad)].tolist()
        if n_bad:
            more = f" and {n_bad - len(bad)} more" if n_bad > len(bad) else ""
            raise ArtifactError(
                f"{self.store_dir / 'embeddings.npy'} holds NaN or Inf in rows {bad}{more}: no embedding a backbone "
                f"gave is stored so, the file was damaged or edited; {rebuild_hint(self.store_dir)}"
            )

    @classmethod
    def open(cls, store_dir: str | os.PathLike, verify: bool = False) -> "EmbeddingStore":
        """Open a complete store; a missing, partial, newer-schema or inconsistent directory raises
        ``ArtifactError`` naming the file. The cheap checks always run (file sizes against the ``.npy`` headers,
        ``n``, ``d`` and dtype of ``meta.json`` against the arrays); ``verify`` also checks every file's hash."""
        store_dir = Path(store_dir)
        if not store_dir.is_dir():
            raise ArtifactError(
                f"no embedding store at {store_dir}; create one with `python scripts/extract.py --out {store_dir}`"
            )
        meta = read_meta(store_dir)
        if meta.get("schema_version", 0) > SCHEMA_VERSION:
            raise ArtifactError(
                f"store {store_dir} has schema {meta.get('schema_version')} ({store_dir / 'meta.json'}), newer than "
                f"this toolkit's {SCHEMA_VERSION}; upgrade the package"
            )
        for name in STORE_FILES:
            if not (store_dir / name).is_file():
                raise ArtifactError(f"store {store_dir} is incomplete: {name} is missing; extract it again")
        x = read_embeddings(store_dir)
        n = int(x.shape[0])
        ids = read_strings(store_dir, "ids.json", allow_int=True)
        if len(ids) != n:
            raise ArtifactError(
                f"{store_dir / 'ids.json'} holds {len(ids)} ids for the {n} rows of {store_dir / 'embeddings.npy'}; "
                f"{rebuild_hint(store_dir)}"
            )
        _check_meta(meta, x, store_dir)
        classes = read_strings(store_dir, "classes.json")
        hint = rebuild_hint(store_dir)
        store = cls(
            store_dir=store_dir,
            x=x,
            labels=read_labels(store_dir, n, len(classes)),
            ids=ids,
            classes=classes,
            split=read_split(store_dir, n),
            skipped=read_json(store_dir / "skipped.json", expect=list, hint=hint),
            meta=meta,
            config=read_json(store_dir / "config.json", expect=dict, hint=hint),
        )
        if verify:
            store.verify()
        return store


def _check_meta(meta: dict, x: np.ndarray, store_dir: Path) -> None:
    """``meta.json`` must describe the arrays it sits beside: a hand-edited or mismatched meta is refused."""
    recorded = {"n": meta.get("n"), "d": meta.get("d"), "dtype": meta.get("dtype")}
    actual = {"n": int(x.shape[0]), "d": int(x.shape[1]), "dtype": str(x.dtype)}
    if recorded != actual:
        diffs = ", ".join(f"{k}={recorded[k]}" for k in actual if recorded[k] != actual[k])
        raise ArtifactError(
            f"{store_dir / 'meta.json'} says {diffs} but {store_dir / 'embeddings.npy'} holds {actual['dtype']} "
            f"({actual['n']}, {actual['d']}): meta.json or the data was edited; {rebuild_hint(store_dir)}"
        )
    if not isinstance(meta.get("content_hash"), str):
        raise ArtifactError(f"{store_dir / 'meta.json'} has no content_hash; {rebuild_hint(store_dir)}")


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
    ``n``, ``d``, ``dtype``, ``content_hash`` and versions are filled in from the data. Returns the meta.
    Refuses what ``EmbeddingStore.open`` would refuse: labels outside ``-1 .. len(classes) - 1``, split rows
    outside the store."""
    work_dir = Path(work_dir)
    x = np.load(work_dir / "embeddings.npy", mmap_mode="r", allow_pickle=False)
    n = x.shape[0]
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (n,) or len(ids) != n:
        raise ValueError(f"store needs one label and one id per row: {n} rows, {labels.shape} labels, {len(ids)} ids")
    if labels.size and (labels.min() < -1 or labels.max() >= len(classes)):
        raise ValueError(f"labels must be -1 (unknown) or a class number 0..{len(classes) - 1} of the {len(classes)} "
                         f"classes; got {labels.min()}..{labels.max()}")
    unknown = set(split) - set(SPLIT_NAMES)
    if unknown:
        raise ValueError(f"unknown split names {sorted(unknown)}; use {SPLIT_NAMES}")
    split = {k: np.asarray(v, dtype=np.int64) for k, v in split.items()}
    for name, rows in split.items():
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise ValueError(f"split {name!r} has row indices outside [0, {n})")
    write_npy(work_dir / "labels.npy", labels)
    write_json(work_dir / "ids.json", [str(i) for i in ids])
    write_json(work_dir / "classes.json", [str(c) for c in classes])
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
        "file_sha256": (hashes := file_hashes(work_dir)),
        "content_hash": content_hash(work_dir, hashes),
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

    For arrays that already exist (tests, small data sets, imports); extraction streams rows instead. Labels
    without ``classes`` get the class names ``"0" .. str(max label)``.
    """
    x = np.asarray(x)
    if x.ndim != 2 or x.dtype not in (np.float32, np.float16):
        raise ValueError(f"embeddings must be a 2-d float32 or float16 array, got {x.dtype} {x.shape}")
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise ValueError(f"embeddings hold NaN or Inf in rows {bad[:10].tolist()}")
    n = x.shape[0]
    if classes is None and labels is not None and np.size(labels):
        classes = [str(i) for i in range(max(int(np.max(labels)) + 1, 0))]
    with building(store_dir, overwrite) as work:
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
    return EmbeddingStore.open(store_dir)
