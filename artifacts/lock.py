"""Advisory locks that keep two runs from building the same artifact at once.

The lock of ``OUT`` is the file ``.OUT.lock`` beside it (and beside its partial directory ``.OUT.partial``).
It is created with ``O_CREAT | O_EXCL``, so exactly one process gets it, and holds JSON naming the holder:
pid, host, the process's start time (to see through pid reuse) and when it was taken. A second run finds the
file and is refused at once with the holder's name. A lock whose holder has died on this host (a ``kill -9``,
a power cut) is stale and is taken over; a lock held on another host is never guessed about, since its pid
cannot be checked from here: the message says which file to delete once that run is known to be gone.

Locks are re-entrant within a process and counted; every lock still held is removed when the interpreter
exits normally. Only this toolkit's runs honour them: they are advisory.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from artifacts.errors import ArtifactError

STALE_UNREADABLE_S = 30.0
"""A lock file that stays empty or unreadable this long was left by a process that died between creating and
writing it; a younger one is being written right now."""

_guard = threading.Lock()
_held: dict[Path, int] = {}  # lock path -> how many times this process holds it


class LockHeld(ArtifactError):
    """Another live run holds the lock of an artifact directory."""


def lock_path(final_dir: str | os.PathLike) -> Path:
    """The lock file of ``final_dir``: ``.NAME.lock`` beside it."""
    final_dir = Path(final_dir)
    return final_dir.with_name(f".{final_dir.name}.lock")


def _start_ticks(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), to tell it from a later process
    that got the same pid; ``None`` where ``/proc`` does not say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _me() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "start_ticks": _start_ticks(os.getpid()),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _alive(holder: dict) -> bool:
    """Whether the holder recorded in a lock (on this host) still runs."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    recorded, now = holder.get("start_ticks"), _start_ticks(pid)
    return recorded is None or now is None or recorded == now


def _read(path: Path) -> dict | None:
    """The holder in a lock file; ``None`` when it is missing; ``{}`` when it cannot be read as a holder."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _is_stale(path: Path, holder: dict) -> bool:
    if not holder:
        try:
            return time.time() - path.stat().st_mtime > STALE_UNREADABLE_S
        except FileNotFoundError:
            return False
    return holder.get("host") == socket.gethostname() and not _alive(holder)


def _describe(holder: dict) -> str:
    if not holder:
        return "a run that is starting (its lock file is not written yet)"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since', '?')}"


def _create(path: Path) -> bool:
    """Create the lock file with this process as holder; False when it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(_me(), f)
        f.flush()
        os.fsync(f.fileno())
    return True


def _remove_stale(path: Path, holder: dict) -> None:
    """Delete a stale lock, unless another process took it over meanwhile.

    Taking over is itself serialised by a short-lived ``.break`` lock: only its holder compares the lock's
    content with the stale holder and deletes it, so a lock that another process has just taken is never
    deleted by a process that saw the stale one a moment earlier.
    """
    breaker = path.with_name(path.name + ".break")
    if not _create(breaker):
        other = _read(breaker)
        if other is not None and _is_stale(breaker, other):
            breaker.unlink(missing_ok=True)  # a process died while taking over; the next attempt retries
        return
    try:
        if _read(path) == holder:
            path.unlink(missing_ok=True)
    finally:
        breaker.unlink(missing_ok=True)


def acquire(final_dir: str | os.PathLike) -> Path:
    """Take the lock of ``final_dir`` (again, if this process holds it); raise ``LockHeld`` naming the holder
    when another live run has it. Returns the lock file."""
    return acquire_file(lock_path(final_dir), final_dir)


def acquire_file(path: str | os.PathLike, what: str | os.PathLike) -> Path:
    """Take the lock file ``path`` that guards ``what`` (named in the message when another live run holds it)."""
    path = Path(path).absolute()
    with _guard:
        if path in _held:
            _held[path] += 1
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            if _create(path):
                _held[path] = 1
                return path
            holder = _read(path)
            if holder is None:
                continue  # released between our two looks
            if not _is_stale(path, holder):
                raise LockHeld(
                    f"{Path(what)} is being written by another run ({_describe(holder)}); wait for it to finish "
                    f"or choose another --out. If that run is gone (it ran on another machine), delete {path}"
                )
            _remove_stale(path, holder)
            time.sleep(0.01)
    raise LockHeld(f"could not take the lock {path}: other runs keep taking it; try again")


def release(final_dir: str | os.PathLike) -> None:
    """Give back one hold of ``final_dir``'s lock; the file goes with the last one. Not held: nothing happens."""
    release_file(lock_path(final_dir))


def release_file(path: str | os.PathLike) -> None:
    """Give back one hold of the lock file ``path``."""
    path = Path(path).absolute()
    with _guard:
        if path not in _held:
            return
        _held[path] -= 1
        if _held[path] > 0:
            return
        del _held[path]
        _unlink_own(path)


def _unlink_own(path: Path) -> None:
    holder = _read(path)
    if holder and holder.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


@contextmanager
def dir_lock(final_dir: str | os.PathLike):
    """Hold the lock of ``final_dir`` for the ``with`` block (for stages that build ``final_dir`` over a long run:
    extraction, SAE training); yields the lock file."""
    path = acquire(final_dir)
    try:
        yield path
    finally:
        release(final_dir)


@atexit.register
def _release_all() -> None:
    with _guard:
        for path in list(_held):
            _unlink_own(path)
        _held.clear()
