"""Atomic files and directories, JSON metadata and content hashes.

A directory is built by ``begin_dir`` in its partial sibling under the advisory lock of ``artifacts.lock`` and
renamed into place by ``commit_dir`` (or ``building`` for both). Only a directory that is recognisably an artifact of
this toolkit (``is_artifact_dir``: a ``meta.json`` with schema and package version) or an empty one is ever
replaced, and only with ``overwrite`` (``check_replaceable``); anything else at the path is refused by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from glob import escape as glob_escape
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from artifacts import lock
from artifacts.errors import ArtifactError, disk_full, is_disk_full

SCHEMA_VERSION = 1
"""Version of the on-disk layout of every artifact; bumped when a reader must change."""


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
    a half-written ``path``; an exception removes the temporary. A full disk is a ``DiskFullError`` naming
    ``path`` (the errno alone names no file). Leftovers of earlier writes of ``path`` killed mid-way (their process
    is gone) are removed first, so that a kill never leaves them for good."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    remove_dead_temporaries(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full(path, e, f"writing {path.name} into {path.parent}") from e
        raise
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def remove_dead_temporaries(path: str | os.PathLike) -> None:
    """Delete ``.NAME.tmp-PID`` siblings of ``path`` whose writing process no longer runs on this host."""
    path = Path(path)
    try:
        leftovers = list(path.parent.glob(f".{glob_escape(path.name)}.tmp-*"))
    except OSError:
        return
    for leftover in leftovers:
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)) and leftover.is_file():
            leftover.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically: a temporary sibling, fsync, then rename."""
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")


_JSON_TYPES = {dict: "a JSON object", list: "a JSON list", str: "a JSON string"}


def read_json(
    path: str | os.PathLike, expect: type | None = None, hint: str = "delete the artifact and rebuild it"
) -> Any:
    """Read a JSON file, naming the file in the error when it is missing, corrupt (including bytes that are not
    text, and nesting too deep to parse) or, with ``expect`` (``dict``, ``list`` or ``str``), of another JSON type.
    ``hint`` is what the error tells the user to do."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    try:
        obj = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({type(e).__name__}: {str(e)[:200]}); {hint}") from e
    if expect is not None and not isinstance(obj, expect):
        raise ArtifactError(
            f"{path} holds {_json_type(obj)} where {_JSON_TYPES.get(expect, expect.__name__)} belongs; {hint}"
        )
    return obj


def _json_type(obj: Any) -> str:
    if obj is None:
        return "null"
    kinds = ((bool, "a JSON boolean"), (dict, "a JSON object"), (list, "a JSON list"), (str, "a JSON string"))
    for kind, name in kinds:
        if isinstance(obj, kind):
            return name
    return "a JSON number"


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


def is_artifact_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by this toolkit: its ``meta.json`` names a schema and package
    version (every stage writes both)."""
    meta_path = Path(path) / "meta.json"
    if not meta_path.is_file():
        return False
    try:
        meta = read_json(meta_path)
    except (ArtifactError, OSError, UnicodeDecodeError):
        return False
    return isinstance(meta, dict) and "schema_version" in meta and "package_version" in meta


def check_replaceable(final_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse to write ``final_dir`` over something: only an artifact of this toolkit (or an empty folder) is ever
    replaced, and only with ``overwrite``. Anything else at that path (a user's folder, a file, a link) is
    refused without suggesting ``--overwrite``, which would not replace it either."""
    final_dir = Path(final_dir)
    if not os.path.lexists(final_dir):
        return
    if final_dir.is_symlink() or not final_dir.is_dir():
        kind = "a symbolic link" if final_dir.is_symlink() else "a file"
        raise ArtifactError(
            f"--out {final_dir} is {kind}, not an artifact directory; it is never replaced: choose another --out"
        )
    if not is_artifact_dir(final_dir) and any(final_dir.iterdir()):
        raise ArtifactError(
            f"--out {final_dir} is a folder that is not an artifact of this toolkit (it has no meta.json with a "
            f"schema_version); it is never replaced or deleted: choose another --out"
        )
    if not overwrite:
        raise ArtifactError(f"{final_dir} already exists; pass --overwrite to replace it, or choose another --out")


_begun: set[Path] = set()  # final directories that begin_dir locked and commit_dir or abandon_dir will release


def _end(final_dir: Path) -> None:
    key = final_dir.absolute()
    if key in _begun:
        _begun.discard(key)
        lock.release(final_dir)


def begin_dir(final_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """A fresh, empty ``partial_dir`` in which to build ``final_dir`` before ``commit_dir`` renames it into place.

    Takes the advisory lock of ``final_dir`` (``artifacts.lock``; another live run building it is refused at
    once, naming it) until ``commit_dir`` or ``abandon_dir``. An existing ``final_dir`` is refused here, before
    any work, unless it is an artifact and ``overwrite`` (``check_replaceable``); leftovers of an earlier attempt
    in the partial directory are cleared.
    """
    final_dir = Path(final_dir)
    key = final_dir.absolute()
    if key not in _begun:
        lock.acquire(final_dir)
        _begun.add(key)
    try:
        check_replaceable(final_dir, overwrite)
        work = partial_dir(final_dir)
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
    except BaseException:
        _end(final_dir)
        raise
    return work


def commit_dir(work_dir: str | os.PathLike, final_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Rename a completed ``work_dir`` to ``final_dir`` in one step, and release the lock ``begin_dir`` took.

    An existing ``final_dir`` is replaced only when it is an artifact and ``overwrite=True``; it is first moved
    aside, so a crash between the two renames leaves either the old or the new artifact, never a mixture.
    """
    work_dir, final_dir = Path(work_dir), Path(final_dir)
    try:
        if os.path.lexists(final_dir):
            check_replaceable(final_dir, overwrite)
            old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
            os.replace(final_dir, old)
            os.replace(work_dir, final_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work_dir, final_dir)
        _fsync_dir(final_dir.parent)
    finally:
        _end(final_dir)
    return final_dir


def abandon_dir(final_dir: str | os.PathLike) -> None:
    """Give up building ``final_dir``: delete its partial directory and release the lock ``begin_dir`` took."""
    final_dir = Path(final_dir)
    shutil.rmtree(partial_dir(final_dir), ignore_errors=True)
    _end(final_dir)


@contextmanager
def building(final_dir: str | os.PathLike, overwrite: bool = False):
    """Build ``final_dir`` in the ``with`` block: yields the partial directory (``begin_dir``), commits it when the
    block ends, and abandons it (deleted, lock released) when the block raises."""
    work = begin_dir(final_dir, overwrite)
    try:
        yield work
    except BaseException:
        abandon_dir(final_dir)
        raise
    commit_dir(work, final_dir, overwrite=overwrite)
