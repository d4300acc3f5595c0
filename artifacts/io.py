"""Atomic files and directories, JSON metadata and content hashes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
"""Version of the on-disk layout of every artifact; bumped when a reader must change."""


class ArtifactError(RuntimeError):
    """An artifact on disk is missing, incomplete or does not match what was asked for."""


def package_version() -> str:
    """The installed version of this toolkit, or ``"unknown"`` when run from an uninstalled tree."""
    try:
        return metadata.version("ttt-concepts")
    except metadata.PackageNotFoundError:
        return "unknown"


def _fsync_dir(path: Path) -> None:
    # Make a rename durable: the directory entry itself must reach the disk.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb"):
    """Write ``path`` atomically: yield a temporary sibling ``.NAME.tmp-PID`` open in ``mode``, then fsync it and
    rename it into place. A crash leaves the previous ``path`` (or none) and at most a temporary leftover, never
    a half-written ``path``; an exception removes the temporary."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically: a temporary sibling, fsync, then rename."""
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, naming the file in the error when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); delete the artifact and rebuild it") from e


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write one ``.npy`` file atomically (never pickled)."""
    with atomic_file(path) as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks so that large files do not fill memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def partial_dir(final_dir: str | os.PathLike) -> Path:
    """The sibling in which ``final_dir`` is built; it survives a crash so that a rerun can resume."""
    final_dir = Path(final_dir)
    return final_dir.with_name(f".{final_dir.name}.partial")


def begin_dir(final_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """A fresh, empty ``partial_dir`` in which to build ``final_dir`` before ``commit_dir`` renames it into place.

    An existing ``final_dir`` is refused here, before any work, unless ``overwrite``; leftovers of an earlier
    attempt in the partial directory are cleared.
    """
    final_dir = Path(final_dir)
    if final_dir.exists() and not overwrite:
        raise ArtifactError(f"{final_dir} already exists; pass --overwrite to replace it")
    work = partial_dir(final_dir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def commit_dir(work_dir: str | os.PathLike, final_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Rename a completed ``work_dir`` to ``final_dir`` in one step.

    An existing ``final_dir`` is replaced only with ``overwrite=True``; it is first moved aside, so
    a crash between the two renames leaves either the old or the new artifact, never a mixture.
    """
    work_dir, final_dir = Path(work_dir), Path(final_dir)
    if final_dir.exists():
        if not overwrite:
            raise ArtifactError(f"{final_dir} already exists; pass --overwrite to replace it")
        old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        os.replace(final_dir, old)
        os.replace(work_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work_dir, final_dir)
    _fsync_dir(final_dir.parent)
    return final_dir
