"""One stage process of the scale rehearsal, measured: wall and CPU time and peak RSS from ``os.wait4`` (the
process's own, not the largest of every child so far as ``RUSAGE_CHILDREN`` would give), the anonymous and
file-backed parts of its RSS sampled from ``/proc`` while it runs, an optional SIGKILL, and a digest of the
toolkit's source it ran (so that a run and its resume are known to have run the same code)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

SOURCE_PACKAGES = ("artifacts", "embeddings", "sae", "analysis", "scripts", "benchmarks")
POLL_S = 0.25
"""Seconds between samples of ``/proc/PID/status``."""


def source_digest(root: Path) -> str:
    """SHA-256 (16 hex digits) over every ``.py`` file of the toolkit's packages under ``root``."""
    h = hashlib.sha256()
    for package in SOURCE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


class RssSampler(threading.Thread):
    """Peaks of ``RssAnon`` and ``RssFile`` of a running process (bytes), sampled every ``POLL_S`` s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_anon, self.peak_file = pid, 0, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if line.startswith(("RssAnon", "RssFile")))
            except (OSError, ValueError):
                return
            self.peak_anon = max(self.peak_anon, _kib(fields.get("RssAnon")))
            self.peak_file = max(self.peak_file, _kib(fields.get("RssFile")))
            self.done.wait(POLL_S)


def _kib(text: str | None) -> int:
    return int(text.split()[0]) * 1024 if text else 0


def spawn(argv: list[str], cwd: Path, stdout_path: Path | None = None, kill_after: float | None = None) -> dict:
    """Run ``argv`` to its end, or SIGKILL it after ``kill_after`` seconds; its wall and CPU seconds, peak RSS,
    the sampled peaks of its anonymous and file-backed RSS, its exit status, and when it was killed."""
    source = source_digest(cwd)
    out = open(stdout_path, "w") if stdout_path is not None else None
    t = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=out, cwd=cwd)
    sampler = RssSampler(proc.pid)
    sampler.start()
    killed_at = None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG if kill_after is not None and killed_at is None else 0)
        if pid:
            break
        if time.perf_counter() - t >= kill_after:
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = time.time()
        else:
            time.sleep(0.2)
    sampler.done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    if out is not None:
        out.close()
    attempt = {"wall_s": time.perf_counter() - t, "cpu_s": usage.ru_utime + usage.ru_stime,
               "peak_rss": usage.ru_maxrss * 1024, "peak_anon": sampler.peak_anon, "peak_file": sampler.peak_file,
               "rc": proc.returncode, "killed": killed_at is not None, "source": source}
    return attempt | ({"killed_at": killed_at} if killed_at is not None else {})
