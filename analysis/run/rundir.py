"""The run directory of ``scripts/reproduce.py``: recognisable by its marker, never someone else's folder.

A run directory holds ``run.json`` (written when the run starts: what wrote it, the preset, when), the stage
directories and their records (``analysis.run.cache``), and ``report.json``/``report.html``. ``--out`` may name a
new path, an empty folder or a run directory of this toolkit; any other folder with content is refused by name,
before anything in it is touched, so that a stage named like one of the user's folders (``sae/``, ``store/``,
``report/``) can never delete it. The run's lock (``.run.lock``) lives inside the run directory, so a run
directory in a read-only parent works.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from artifacts import ArtifactError, SCHEMA_VERSION, lock, package_version, read_json, write_json

MARKER = "run.json"
KIND = "ttt-concepts.run"
LOCK_NAME = ".run.lock"
RECORDS = "stages"


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds this toolkit's run marker."""
    marker = path / MARKER
    if not marker.is_file():
        return False
    try:
        meta = read_json(marker)
    except ArtifactError:
        return False
    return isinstance(meta, dict) and meta.get("kind") == KIND


RUN_ENTRIES = {"stages", "report.json", "report.html", "report", "backbone", "store", "sae", "codes", "concepts",
               "ttt", "width", "theory", ".next"}
"""What a run directory of an earlier version (before the marker) may hold, besides hidden files."""


def _earlier_run_dir(path: Path) -> bool:
    """A run directory written before the marker existed: a stage record in ``stages/`` and nothing else but run
    entries and hidden files (locks, partial directories)."""
    names = {p.name for p in path.iterdir()}
    if not (path / RECORDS).is_dir() or any(n not in RUN_ENTRIES and not n.startswith(".") for n in names):
        return False
    for record in (path / RECORDS).glob("*.json"):
        try:
            body = read_json(record)
        except ArtifactError:
            continue
        if isinstance(body, dict) and {"stage", "key"} <= body.keys():
            return True
    return False


def open_run_dir(out: str | os.PathLike, preset: str) -> Path:
    """Make ``out`` a run directory (a new path or an empty folder gets the marker) or refuse it, by name, when it is
    a file or a folder with content that is not a run directory. Takes the run's lock; ``close_run_dir`` gives it
    back."""
    out = Path(out)
    if os.path.lexists(out) and not out.is_dir():
        raise ArtifactError(f"--out {out} is a file, not a run directory: choose another --out")
    if out.is_dir() and not is_run_dir(out) and not _earlier_run_dir(out):
        content = sorted(p.name for p in out.iterdir())
        if content:
            shown = ", ".join(content[:5]) + (f" and {len(content) - 5} more" if len(content) > 5 else "")
            raise ArtifactError(
                f"--out {out} is a folder with content ({shown}) but not a run directory of this toolkit (it has no "
                f"{MARKER}); reproduce.py never writes into or deletes from such a folder: choose a new or empty --out")
    out.mkdir(parents=True, exist_ok=True)
    lock.acquire_file(out / LOCK_NAME, out)
    try:
        if not is_run_dir(out):
            write_json(out / MARKER, {"kind": KIND, "schema_version": SCHEMA_VERSION, "preset": preset,
                                      "package_version": package_version(),
                                      "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    except BaseException:
        lock.release_file(out / LOCK_NAME)
        raise
    return out


def close_run_dir(out: str | os.PathLike) -> None:
    lock.release_file(Path(out) / LOCK_NAME)
