"""``.npy`` files checked before they are read, and written so that a full disk is an error, not a crash.

Reading: ``check_npy`` reads only the header and compares the file's size with it, so that a truncated, padded or
hand-made file is refused by name before numpy maps or loads it (numpy's own errors name no file, and a header
can promise far more bytes than the file holds).

Writing: ``write_npy_rows`` streams blocks with ordinary writes, and ``create_npy`` returns a memory map of a file
whose blocks are reserved first (``os.posix_fallocate``, or zeros written where the file system cannot reserve).
A memory-mapped write into a sparse file on a full disk is a SIGBUS ("Bus error"): the process dies with no message
and no clean-up. An ordinary write or a reservation fails with ENOSPC instead, which becomes a ``DiskFullError``
naming the file; the half-written file is removed.
"""

from __future__ import annotations

import math
import os
import tokenize
from pathlib import Path
from typing import Iterable

import numpy as np

from artifacts.errors import ArtifactError, disk_full, is_disk_full

_ZEROS = bytes(1 << 22)
HEADER_ERRORS = (ValueError, OSError, EOFError, SyntaxError, TypeError, UnicodeDecodeError, tokenize.TokenError,
                 RecursionError, OverflowError)
"""What numpy raises for an ``.npy`` header it cannot parse (it tokenizes and evaluates the header's text)."""


def npy_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, data offset)`` from an ``.npy`` file's header; numpy's errors for an unreadable one."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        fmt = np.lib.format
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read_header(f)
        return tuple(int(s) for s in shape), dtype, f.tell()


def check_npy(
    path: str | os.PathLike, hint: str, kinds: str | None = None, ndim: int | None = None
) -> tuple[tuple[int, ...], np.dtype]:
    """Refuse, naming ``path`` and ending with ``hint`` (what to run to fix it), an ``.npy`` file whose header is
    unreadable, that holds Python objects, whose size is not what its header describes (a truncated copy, an
    interrupted transfer, trailing bytes), whose dtype kind is not one of ``kinds`` (numpy's letters: ``"f"``
    float, ``"iu"`` integer) or whose number of dimensions is not ``ndim``. Returns its shape and dtype."""
    path = Path(path)
    try:
        shape, dtype, offset = npy_header(path)
    except HEADER_ERRORS as e:
        raise ArtifactError(f"{path} is truncated or corrupt (unreadable header: {e}); {hint}") from e
    if dtype.hasobject:
        raise ArtifactError(f"{path} holds Python objects, which this artifact never does; {hint}")
    expected = offset + math.prod(shape) * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        state = "truncated" if size < expected else "corrupt"
        raise ArtifactError(
            f"{path} is {state}: {size} bytes where its header ({dtype} {shape}) needs {expected}; {hint}"
        )
    if kinds is not None and dtype.kind not in kinds:
        words = {"f": "floats", "i": "integers", "u": "unsigned integers", "b": "booleans"}
        wanted = " or ".join(words[k] for k in kinds)
        raise ArtifactError(f"{path} holds {dtype} where {wanted} belong; {hint}")
    if ndim is not None and len(shape) != ndim:
        raise ArtifactError(f"{path} has shape {shape} where a {ndim}-d array belongs; {hint}")
    return shape, dtype


def _header(dtype: np.dtype, shape: tuple[int, ...]) -> dict:
    return {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}


def _reserve(f, n_bytes: int, fill: bool) -> None:
    """Reserve the first ``n_bytes`` of the open file ``f`` on disk; a full disk raises its ``OSError`` now. Where
    the file system cannot reserve, ``fill`` writes zeros up to ``n_bytes`` (which allocates them or fails)."""
    f.flush()
    try:
        os.posix_fallocate(f.fileno(), 0, n_bytes)
        return
    except AttributeError:  # no posix_fallocate on this platform
        pass
    except OSError as e:
        if is_disk_full(e):
            raise
        # EINVAL, EOPNOTSUPP, ENODEV: this file system does not reserve; the writes themselves will report
    if fill:
        f.seek(0, os.SEEK_END)
        remaining = n_bytes - f.tell()
        while remaining > 0:
            remaining -= f.write(_ZEROS[: min(remaining, len(_ZEROS))])
        f.flush()


def create_npy(path: str | os.PathLike, dtype, shape: tuple[int, ...], what: str) -> np.memmap:
    """A new ``.npy`` file of ``shape`` and ``dtype`` at ``path``, its blocks reserved on disk, open as a writable
    memory map. ``what`` names the stage in the ``DiskFullError`` raised when the disk cannot hold it."""
    path, dtype, shape = Path(path), np.dtype(dtype), tuple(int(s) for s in shape)
    n_bytes = 0
    try:
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, _header(dtype, shape))
            n_bytes = f.tell() + math.prod(shape) * dtype.itemsize
            _reserve(f, n_bytes, fill=True)
    except BaseException as e:
        path.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full(path, e, what, n_bytes) from e
        raise
    return np.lib.format.open_memmap(path, mode="r+")


def write_npy_rows(
    path: str | os.PathLike, dtype, shape: tuple[int, ...], blocks: Iterable[np.ndarray], what: str
) -> None:
    """Write an ``.npy`` file of ``shape`` and ``dtype`` from ``blocks`` of rows, in order, with ordinary writes
    after reserving its size, then fsync it. ``what`` names the stage in the ``DiskFullError`` raised when the disk
    cannot hold it; on any error the half-written file is removed."""
    path, dtype, shape = Path(path), np.dtype(dtype), tuple(int(s) for s in shape)
    n_bytes = 0
    try:
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, _header(dtype, shape))
            offset = f.tell()
            n_bytes = offset + math.prod(shape) * dtype.itemsize
            _reserve(f, n_bytes, fill=False)
            f.seek(offset)
            n_rows = 0
            for block in blocks:
                block = np.ascontiguousarray(block)
                assert block.dtype == dtype and block.shape[1:] == shape[1:], (block.dtype, block.shape, shape)
                f.write(block.data)
                n_rows += block.shape[0]
            assert n_rows == shape[0], f"wrote {n_rows} rows of {shape[0]}"
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        path.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full(path, e, what, n_bytes) from e
        raise
