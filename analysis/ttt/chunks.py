"""Resumable, rank-split TTT evaluation: queries in fixed chunks, each chunk's results saved atomically.

Chunk ``i`` holds queries ``[i·chunk_size, (i+1)·chunk_size)`` whatever the number of processes, and under
``torchrun`` rank ``r`` computes the chunks with ``i % world_size == r``; since a chunk's computation does not
depend on who runs it, the assembled result equals a one-process run. A killed evaluation finds its finished
chunks on disk (``chunk_000012.npz``, written by rename) and computes only the rest.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from analysis.heads import n_rows
from analysis.neighbours import SparseCodes
from analysis.local_ttt import LocalTTT, TTTResult
from artifacts import ArtifactError, atomic_file, read_json, write_json
from artifacts.ranks import Ranks

ARRAYS = ("predictions", "global_predictions", "majority", "neighbours", "final_loss", "update_norm", "loss_curve")
FINGERPRINT = "chunks.json"


def evaluate(ttt: LocalTTT, x_query, *, exclude=None, chunk_dir: str | os.PathLike | None = None,
             chunk_size: int = 1024, ranks: Ranks = Ranks(), fingerprint: dict | None = None,
             log=None) -> TTTResult:
    """``ttt.predict(x_query, exclude)``, chunked; with ``chunk_dir`` resumable and split over ``ranks``.

    ``fingerprint``: what produced the chunks (settings, data hashes); chunks of another fingerprint are refused.
    Every rank returns the whole result.
    """
    m = n_rows(x_query)
    n_chunks = max(1, -(-m // chunk_size))
    if chunk_dir is None and ranks.world_size == 1:
        return _merge([_compute(ttt, x_query, exclude, i, chunk_size, m) for i in range(n_chunks)])
    if chunk_dir is None:
        raise ValueError("a multi-process evaluation needs a chunk directory shared by the ranks")
    chunk_dir = Path(chunk_dir)
    if ranks.is_main:
        _claim(chunk_dir, {"n_queries": m, "chunk_size": chunk_size, **(fingerprint or {})})
    ranks.barrier()
    for i in range(ranks.rank, n_chunks, ranks.world_size):
        path = chunk_dir / f"chunk_{i:06d}.npz"
        if path.is_file():
            continue
        part = _compute(ttt, x_query, exclude, i, chunk_size, m)
        with atomic_file(path) as f:
            np.savez(f, **_arrays(part))
        if log is not None:
            log(f"ttt: chunk {i + 1}/{n_chunks} done (rank {ranks.rank})")
    ranks.barrier()
    paths = [chunk_dir / f"chunk_{i:06d}.npz" for i in range(n_chunks)]
    parts = [_load(path, min(chunk_size, m - i * chunk_size)) for i, path in enumerate(paths)]
    _check_alike(paths, parts)
    return _merge(parts)


def _claim(chunk_dir: Path, fingerprint: dict) -> None:
    chunk_dir.mkdir(parents=True, exist_ok=True)
    path = chunk_dir / FINGERPRINT
    if path.is_file():
        found = read_json(path, hint=f"delete {chunk_dir} to start again")
        if found != _plain(fingerprint):
            raise ArtifactError(f"{path} records TTT chunks of other settings ({found}); delete {chunk_dir} to start "
                                "again")
        return
    write_json(path, _plain(fingerprint))


def _plain(obj):
    import json
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _compute(ttt: LocalTTT, x_query, exclude, i: int, chunk_size: int, m: int) -> TTTResult:
    rows = np.arange(i * chunk_size, min((i + 1) * chunk_size, m))
    x = x_query.take(rows) if isinstance(x_query, SparseCodes) else np.asarray(x_query[rows[0]:rows[-1] + 1])
    ex = None if exclude is None else np.asarray(exclude)[rows]
    return ttt.predict(x, exclude=ex)


def _arrays(r: TTTResult) -> dict:
    return {**{k: getattr(r, k) for k in ARRAYS}, **r.extras}


def _load(path: Path, n_rows_expected: int) -> TTTResult:
    if not path.is_file():
        raise ArtifactError(f"{path} is missing after every rank finished; run the evaluation again")
    fix = "delete it and run again: the chunk is recomputed"
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, RuntimeError) as e:
        raise ArtifactError(f"{path} is truncated or corrupt ({e}); {fix}") from None
    missing = [k for k in ARRAYS if k not in arrays]
    lengths = {len(a) if a.ndim else None for a in arrays.values()}
    if missing or lengths != {n_rows_expected}:
        raise ArtifactError(f"{path} is not a TTT chunk of {n_rows_expected} queries (missing {missing}, row counts "
                            f"{sorted(lengths, key=str)}); {fix}")
    return TTTResult(**{k: arrays.pop(k) for k in ARRAYS}, extras=arrays)


def _check_alike(paths: list[Path], parts: list[TTTResult]) -> None:
    """Every chunk holds the same arrays, each with the same dtype and the same shape but for its rows; a chunk
    that differs from the first is named with it (either may be the damaged one)."""
    def layout(part: TTTResult) -> dict:
        return {k: (a.dtype.str, a.shape[1:]) for k, a in _arrays(part).items()}

    first = layout(parts[0])
    for path, part in zip(paths[1:], parts[1:]):
        if layout(part) != first:
            raise ArtifactError(f"{path} and {paths[0]} hold arrays of other kinds or shapes: one of them is damaged; "
                                f"delete both and run again: they are recomputed")


def _merge(parts: list[TTTResult]) -> TTTResult:
    if len(parts) == 1:
        return parts[0]
    cat = {k: np.concatenate([getattr(p, k) for p in parts]) for k in ARRAYS}
    extras = {k: np.concatenate([p.extras[k] for p in parts]) for k in parts[0].extras}
    return TTTResult(**cat, extras=extras)
