"""Chunk files of a resumable extraction, and their assembly into a store's ``embeddings.npy``.

The input rows ``0 .. n_inputs`` are cut into fixed chunks of ``chunk_size`` rows. Each chunk is written once,
atomically, as ``chunks/chunk-NNNNNN.npz`` inside the extraction's partial directory when all its rows are done:

    x        (n_ok, d)  embeddings of the rows that could be read, in row order, in the store's dtype
    ok       (n_rows,)  bool, whether each input row of the chunk is in ``x``
    reasons  (n_rows,)  str, why a row was skipped ("" for rows that are in ``x``)

A chunk file either exists complete or not at all, so a run killed at any moment resumes at the first missing
chunk; which process wrote a chunk, and when, does not change its bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from artifacts import ArtifactError, atomic_file, read_json, write_json, write_npy_rows

CHUNKS_DIRNAME = "chunks"
FINGERPRINT_NAME = "fingerprint.json"
_CHUNK_RE = re.compile(r"^chunk-(\d{6,})\.npz$")


@dataclass(frozen=True)
class ChunkPlan:
    """Fixed chunks of ``chunk_size`` input rows; chunk ``i`` goes to rank ``i % world_size``."""

    n_inputs: int
    """Number of input rows (images in the source, good or bad)."""
    chunk_size: int
    """Input rows per chunk (the last chunk may be shorter)."""

    def __post_init__(self):
        if self.n_inputs < 0 or self.chunk_size < 1:
            raise ValueError(f"bad chunk plan: {self.n_inputs} inputs, chunk size {self.chunk_size}")

    @property
    def n_chunks(self) -> int:
        return -(-self.n_inputs // self.chunk_size)

    def rows(self, chunk: int) -> range:
        """The input rows of one chunk."""
        start = chunk * self.chunk_size
        return range(start, min(start + self.chunk_size, self.n_inputs))

    def chunks_of_rank(self, rank: int, world_size: int) -> list[int]:
        """The chunks one process computes: round-robin, so ranks get nearly equal work."""
        return list(range(rank, self.n_chunks, world_size))

    def batches(self, chunk: int, batch_size: int) -> list[list[int]]:
        """The batches of one chunk. Batches never cross a chunk boundary, so every run (resumed or not,
        any number of processes) feeds the model exactly the same batches."""
        rows = self.rows(chunk)
        return [list(rows[s : s + batch_size]) for s in range(0, len(rows), batch_size)]


def chunk_path(chunks_dir: str | os.PathLike, chunk: int) -> Path:
    return Path(chunks_dir) / f"chunk-{chunk:06d}.npz"


def write_chunk(chunks_dir: str | os.PathLike, chunk: int, x: np.ndarray, ok: np.ndarray, reasons: list[str]) -> Path:
    """Write one finished chunk atomically (temporary sibling, fsync, rename)."""
    ok = np.asarray(ok, dtype=bool)
    assert x.ndim == 2 and x.shape[0] == int(ok.sum()) and len(reasons) == ok.shape[0]
    path = chunk_path(chunks_dir, chunk)
    # A fixed-width unicode array (never an object array), so that loading needs no pickle.
    reasons_arr = np.asarray(list(reasons), dtype=f"<U{max([1, *map(len, reasons)])}")
    with atomic_file(path) as f:
        np.savez(f, x=np.ascontiguousarray(x), ok=ok, reasons=reasons_arr)
    return path


def read_chunk_mask(chunks_dir: str | os.PathLike, chunk: int) -> tuple[np.ndarray, list[str]]:
    """The ``ok`` mask and skip reasons of one chunk, without reading its embeddings."""
    with np.load(chunk_path(chunks_dir, chunk), allow_pickle=False) as z:
        return z["ok"], [str(r) for r in z["reasons"]]


def done_chunks(chunks_dir: str | os.PathLike) -> set[int]:
    """Chunks whose file is complete; leftovers of interrupted writes are removed."""
    chunks_dir = Path(chunks_dir)
    done = set()
    if not chunks_dir.is_dir():
        return done
    for p in chunks_dir.iterdir():
        m = _CHUNK_RE.match(p.name)
        if m:
            done.add(int(m.group(1)))
    return done


def remove_temporaries(chunks_dir: str | os.PathLike) -> None:
    """Delete half-written chunk files of killed runs (they never carry a chunk's final name)."""
    for p in Path(chunks_dir).glob(".chunk-*.tmp-*"):
        p.unlink(missing_ok=True)


def fingerprint_digest(fingerprint: dict) -> str:
    """SHA-256 of a fingerprint's canonical JSON."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {str(a)[:80]} -> {str(b)[:80]}")
    return out


def claim_partial(work_dir: str | os.PathLike, fingerprint: dict, restart: bool) -> bool:
    """Prepare ``work_dir`` for the extraction described by ``fingerprint``.

    A partial directory left by an earlier run with the same fingerprint is resumed (returns True); one with a
    different fingerprint is refused, naming the differences, unless ``restart`` (then it is emptied).
    """
    work_dir = Path(work_dir)
    fp_path = work_dir / FINGERPRINT_NAME
    resumed = False
    if work_dir.exists():
        old = None
        if fp_path.is_file():
            try:
                old = read_json(fp_path)
            except ArtifactError:
                old = None
        if old == fingerprint:
            resumed = True
        elif not restart:
            diffs = _differences(old, fingerprint) if isinstance(old, dict) else ["its fingerprint is unreadable"]
            raise ArtifactError(
                f"{work_dir} holds a partial extraction made with different settings "
                f"({'; '.join(diffs[:6])}); rerun with the same settings to resume it, or pass --overwrite "
                f"to discard it"
            )
        else:
            import shutil

            shutil.rmtree(work_dir)
    (work_dir / CHUNKS_DIRNAME).mkdir(parents=True, exist_ok=True)
    if not resumed:
        write_json(fp_path, fingerprint)
    remove_temporaries(work_dir / CHUNKS_DIRNAME)
    return resumed


def assemble(
    chunks_dir: str | os.PathLike, plan: ChunkPlan, embeddings_path: str | os.PathLike, d: int, dtype: str
) -> tuple[np.ndarray, list[str]]:
    """Concatenate the embeddings of every chunk, in chunk order, into one ``.npy`` file.

    The output is written one chunk at a time with ordinary writes, into space reserved for the whole file first
    (``artifacts.write_npy_rows``), so that a store larger than memory can be assembled and a full disk is a
    ``DiskFullError`` naming the file, not a crash. Returns the ``ok`` mask and the skip reasons of all
    ``n_inputs`` rows.
    """
    missing = [c for c in range(plan.n_chunks) if not chunk_path(chunks_dir, c).is_file()]
    if missing:
        raise ArtifactError(f"{chunks_dir} lacks chunks {missing[:10]}; rerun the same extraction to compute them")
    masks, reasons = [], []
    for c in range(plan.n_chunks):
        ok, why = read_chunk_mask(chunks_dir, c)
        if ok.shape != (len(plan.rows(c)),):
            raise ArtifactError(f"{chunk_path(chunks_dir, c)} has {ok.shape[0]} rows, expected {len(plan.rows(c))}")
        masks.append(ok)
        reasons += why
    ok_all = np.concatenate(masks) if masks else np.zeros(0, dtype=bool)
    what = f"extraction: assembling the store's embeddings from the {plan.n_chunks} chunks in {chunks_dir}"
    write_npy_rows(embeddings_path, dtype, (int(ok_all.sum()), d), _chunk_rows(chunks_dir, masks, d, dtype), what)
    return ok_all, reasons


def _chunk_rows(chunks_dir, masks: list[np.ndarray], d: int, dtype: str):
    """The embeddings of each chunk in turn, checked against its mask, the width and the dtype."""
    for c, ok in enumerate(masks):
        with np.load(chunk_path(chunks_dir, c), allow_pickle=False) as z:
            x = z["x"]
        if x.shape != (int(ok.sum()), d) or x.dtype != np.dtype(dtype):
            raise ArtifactError(f"{chunk_path(chunks_dir, c)} holds {x.dtype} {x.shape}, expected {dtype} "
                                f"({int(ok.sum())}, {d}); rerun the extraction with --overwrite")
        yield x
