"""The exception types of artifacts on disk, shared by every stage and by the scripts' error handling."""

from __future__ import annotations

import errno
import os
import re


class ArtifactError(RuntimeError):
    """An artifact on disk is missing, incomplete or does not match what was asked for."""


class DiskFullError(OSError, ArtifactError):
    """The disk (or the user's quota) filled up while a file was written. It is both an ``OSError`` (with the
    errno and the file name) and an ``ArtifactError``; its message is one sentence naming the file, what was being
    written and what to do."""

    def __str__(self) -> str:
        return str(self.strerror)


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""``OSError`` numbers that mean no more bytes fit: a full disk, a full quota, a file size limit."""


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` is an ``OSError`` saying that no more bytes fit (``DISK_FULL_ERRNOS``)."""
    return isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS


def disk_full(path: str | os.PathLike, cause: OSError, what: str, n_bytes: int | None = None) -> DiskFullError:
    """The ``DiskFullError`` for ``cause`` (an ``OSError`` with a ``DISK_FULL_ERRNOS`` number) raised while writing
    ``path``; ``what`` says which stage was writing it, ``n_bytes`` how many bytes the file needs, when known."""
    if isinstance(cause, DiskFullError):
        return cause
    need = f" (it needs {_size(n_bytes)})" if n_bytes else ""
    reason = os.strerror(cause.errno) if cause.errno else str(cause)
    message = (
        f"{reason} while writing {path}{need} ({what}): nothing was committed under the final name; free space "
        f"on that file system (or choose another --out) and run the same command again"
    )
    return DiskFullError(cause.errno, message, os.fspath(path))


def _size(n_bytes: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "bytes" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    raise AssertionError("unreachable")


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_UNPICKLER = re.compile(r"WeightsUnpickler error:\s*(\S[^\n]*)")
_ADVICE = re.compile(r"weights_only|trust|can still be loaded|add_safe_globals|safe_globals", re.IGNORECASE)


def torch_load_refusal(e: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in one clause that never advises unpickling it.

    Torch's own message suggests re-running with ``weights_only=False`` or allow-listing the class, either of
    which runs whatever code the file holds; neither is passed on to the user.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    found = _UNSUPPORTED_GLOBAL.search(text)
    if found:
        return f"it holds a pickled Python object ({found.group(1)}), not only tensors and plain values"
    found = _UNPICKLER.search(text)
    if found:
        return f"it is not a tensor file written by torch.save (unpickler: {found.group(1).strip()})"
    kept = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n", text) if s.strip() and not _ADVICE.search(s)]
    return kept[0] if kept else f"{type(e).__name__} while reading it"
