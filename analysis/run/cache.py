"""The stage cache of a run directory: every stage is keyed by a content hash of its inputs and settings.

A run is a chain of stages (backbone → store → SAE → codes → studies → report). Each stage writes one
directory ``RUN_DIR/<stage>/`` and, once that directory is complete, a record ``RUN_DIR/stages/<stage>.json``:

    {"stage", "key", "version", "settings", "parents": {name: key}, "result", "files", "seconds",
     "cpu_seconds", "finished_at", "digest"}

``key`` is the SHA-256 of the stage's name, version, settings and the keys of its parents, so it changes when
any setting upstream changes (a Merkle chain). ``files`` fingerprints the stage directory (a SHA-256 per file up
to ``HASHED_FILE_BYTES``, size and modification time above) and ``digest`` is the SHA-256 of the record itself:
a record or a result file edited by hand no longer matches, and the stage is rebuilt instead of trusted.

On a rerun:

- record present with the same key, its digest and its directory's files intact: the stage is reused;
- anything else: the stage is rebuilt, and the log says why (which settings or parents changed). A changed stage
  is built *beside* the old one, in ``RUN_DIR/.next/<stage>/``; only once it has succeeded does it replace the
  old directory and record (``_install``). A stage that fails leaves the old result and its record untouched.
- A stage killed mid-way leaves its partial directory (``.next/.NAME.partial``, and ``.next/.NAME.resume`` for
  checkpoints kept apart); ``stages/<stage>.pending.json`` names the key it was run with, so a resumable stage
  (extraction, SAE training, the TTT evaluation) continues it only when the key is the same, and it is cleared
  otherwise. A kill during the replacement itself is finished forward when the cache is next opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from artifacts import (
    ArtifactError, package_version, partial_dir, read_json, settings_differences, sha256_file, write_json,
)

RECORDS_DIRNAME = "stages"
NEXT_DIRNAME = ".next"
"""Where a changed stage is built, beside its old result, until it has succeeded."""
HASHED_FILE_BYTES = 64 << 20
"""Files up to this size are fingerprinted by their SHA-256; larger ones (embeddings, codes) by size and
modification time, so that reusing a large stage does not read it all again (the store verifies its own hash)."""


def stage_key(name: str, version: int, settings: dict, parents: dict[str, str]) -> str:
    """The content hash of a stage: its name, version, settings and its parents' keys (sorted JSON)."""
    text = json.dumps({"stage": name, "version": version, "settings": settings, "parents": parents},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Stage:
    """One cached step of a run."""

    name: str
    """Directory and record name (``backbone``, ``store``, ``sae`` ...)."""
    settings: dict
    """Every setting that decides the stage's output (JSON-able); part of the key."""
    run: Callable[[Path, dict[str, "StageResult"]], dict]
    """``run(out_dir, parents) -> result``: builds ``out_dir`` (which does not exist yet) and returns a JSON-able
    summary kept in the record."""
    parents: tuple[str, ...] = ()
    """Names of the stages whose outputs this one reads."""
    version: int = 1
    """Bumped when the stage's code changes what it writes, so that old results are not reused."""


@dataclass
class StageResult:
    """A finished stage: where its directory is, its key, its summary, and how long it took."""

    name: str
    key: str
    dir: Path
    result: dict
    seconds: float
    """Seconds the stage took when it was computed."""
    reused: bool
    """Whether this run reused it instead of computing it."""
    settings: dict = field(default_factory=dict)
    cpu_seconds: float | None = None
    """CPU seconds of this process while the stage was computed (all its threads): on shared cores the wall time
    grows with other processes' load, this does not."""


class StageCache:
    """Runs stages into ``run_dir``, reusing those whose key matches their record (see the module docstring)."""

    def __init__(self, run_dir: str | Path, log: Callable[[str], None] = print):
        self.run_dir = Path(run_dir)
        self.records_dir = self.run_dir / RECORDS_DIRNAME
        self.next_dir = self.run_dir / NEXT_DIRNAME
        self.records_dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.results: dict[str, StageResult] = {}
        remove_leftovers(self.run_dir)  # beside report.json and report.html
        remove_leftovers(self.records_dir)
        for record in sorted(self.records_dir.glob("*.next.json")):
            self._install(record.name[: -len(".next.json")])  # a replacement a kill interrupted

    def record_path(self, name: str) -> Path:
        return self.records_dir / f"{name}.json"

    def stage_dir(self, name: str) -> Path:
        """The final directory of stage ``name``; refused when it is a link (a run's stages are its own)."""
        out_dir = self.run_dir / name
        if out_dir.is_symlink():
            raise ArtifactError(f"{out_dir} is a symbolic link; the stages of a run directory are never links, "
                                f"since a rebuild would delete what it points to: remove the link and rerun")
        if out_dir.exists() and not out_dir.is_dir():
            raise ArtifactError(f"{out_dir} is a file, not a stage directory; move it away and rerun")
        return out_dir

    def run(self, stage: Stage) -> StageResult:
        """Reuse or compute ``stage``; its parents must have run in this cache already."""
        missing = [p for p in stage.parents if p not in self.results]
        if missing:
            raise ValueError(f"stage {stage.name!r} needs {missing} to run first")
        parents = {p: self.results[p].key for p in stage.parents}
        key = stage_key(stage.name, stage.version, stage.settings, parents)
        out_dir = self.stage_dir(stage.name)
        reused = self._reusable(stage, key, parents, out_dir)
        if reused is not None:
            self.results[stage.name] = reused
            self.log(f"{stage.name}: reusing {out_dir} (key {key[:12]}, computed in {reused.seconds:.1f} s)")
            return reused
        build = self._prepare(stage.name, key)
        t0, c0 = time.perf_counter(), time.process_time()
        result = stage.run(build, {p: self.results[p] for p in stage.parents})
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        if not build.is_dir():
            raise ArtifactError(f"stage {stage.name!r} finished without writing {build}")
        record = {
            "stage": stage.name, "key": key, "version": stage.version, "settings": stage.settings,
            "parents": parents, "result": result, "files": fingerprint_files(build), "seconds": seconds,
            "cpu_seconds": cpu, "package_version": package_version(),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(self.records_dir / f"{stage.name}.next.json", {**record, "digest": record_digest(record)})
        self._install(stage.name)
        done = StageResult(stage.name, key, out_dir, result, seconds, False, stage.settings, cpu)
        self.results[stage.name] = done
        self.log(f"{stage.name}: done in {seconds:.1f} s ({cpu:.1f} s CPU)")
        return done

    def _install(self, name: str) -> None:
        """Put a finished build in place of the old directory and record: the old directory is moved aside, the new
        one renamed in, the record replaced, the old one deleted. Each step is a rename, and a kill between them is
        finished forward by the next ``StageCache`` (the new build is complete once its ``.next.json`` exists)."""
        build, out_dir = self.next_dir / name, self.stage_dir(name)
        old = self.next_dir / f".{name}.old"
        if build.is_dir():
            if out_dir.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(out_dir, old)
            os.replace(build, out_dir)
        os.replace(self.records_dir / f"{name}.next.json", self.record_path(name))
        self._pending_path(name).unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)

    def _reusable(self, stage: Stage, key: str, parents: dict, out_dir: Path) -> StageResult | None:
        path = self.record_path(stage.name)
        if not path.is_file():
            if out_dir.exists():
                self.log(f"{stage.name}: {out_dir} has no completion record (an interrupted run); rebuilding it")
            return None
        try:
            record = read_json(path)
        except ArtifactError:
            record = None
        if not isinstance(record, dict):
            self.log(f"{stage.name}: its record {path} is unreadable; rebuilding the stage")
            return None
        if record.get("key") != key:
            self.log(f"{stage.name}: {_why_changed(stage, record, parents)}; rerunning it")
            return None
        if not out_dir.is_dir():
            self.log(f"{stage.name}: {out_dir} is missing; rebuilding it")
            return None
        tampered = _tampered(record, out_dir)
        if tampered:
            self.log(f"{stage.name}: {tampered} since the stage finished; rebuilding it")
            return None
        return StageResult(stage.name, key, out_dir, record.get("result") or {}, float(record.get("seconds", 0.0)),
                           True, stage.settings, record.get("cpu_seconds"))

    def _pending_path(self, name: str) -> Path:
        return self.records_dir / f"{name}.pending.json"

    def _prepare(self, name: str, key: str) -> Path:
        """The directory to build stage ``name`` in, beside its old result (kept until the new one succeeds); a
        partial build of the same key is kept (a resumable stage continues it), one of another key is cleared."""
        build = self.next_dir / name
        self.next_dir.mkdir(exist_ok=True)
        shutil.rmtree(build, ignore_errors=True)
        pending = self._pending_path(name)
        if not (pending.is_file() and _read_key(pending) == key):
            shutil.rmtree(partial_dir(build), ignore_errors=True)
            shutil.rmtree(resume_dir(build), ignore_errors=True)
        write_json(pending, {"stage": name, "key": key})
        return build


def resume_dir(out_dir: Path) -> Path:
    """Where a stage keeps checkpoints that must outlive its partial directory (``.NAME.resume``); cleared with the
    partial directory when the stage's key changes."""
    return out_dir.with_name(f".{out_dir.name}.resume")


def _read_key(path: Path) -> str | None:
    try:
        return read_json(path).get("key")
    except ArtifactError:
        return None


def _why_changed(stage: Stage, record: dict, parents: dict) -> str:
    """One line: which settings and which parents differ from the record."""
    reasons = settings_differences(record.get("settings", {}), stage.settings)
    dropped = sorted(set(record.get("settings", {})) - set(stage.settings))
    reasons += [f"{k}: recorded {record['settings'][k]!r}, no longer set" for k in dropped]
    old_parents = record.get("parents", {})
    reasons += [f"input {p!r} changed" for p in sorted(parents) if old_parents.get(p) != parents[p]]
    if record.get("version") != stage.version:
        reasons.append(f"stage version {record.get('version')} -> {stage.version}")
    return "settings changed (" + "; ".join(reasons) + ")" if reasons else "its key changed"


def fingerprint_files(directory: Path) -> dict[str, str]:
    """``{relative path: fingerprint}`` of every file under ``directory`` (see ``HASHED_FILE_BYTES``)."""
    found = {}
    for path in sorted(directory.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        stat = path.stat()
        rel = path.relative_to(directory).as_posix()
        if stat.st_size <= HASHED_FILE_BYTES:
            found[rel] = "sha256:" + sha256_file(path)
        else:
            found[rel] = f"size:{stat.st_size}:mtime_ns:{stat.st_mtime_ns}"
    return found


def record_digest(record: dict) -> str:
    """The SHA-256 of a record without its ``digest`` (canonical JSON)."""
    body = {k: v for k, v in record.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _tampered(record: dict, out_dir: Path) -> str | None:
    """Why ``record`` no longer describes ``out_dir`` (``None`` when it does)."""
    if not isinstance(record.get("digest"), str) or not isinstance(record.get("files"), dict):
        return "its record has no digest or file fingerprints (an older version wrote it, or it was edited)"
    if record["digest"] != record_digest(record):
        return f"its record {out_dir.parent / RECORDS_DIRNAME / (out_dir.name + '.json')} was edited"
    found = fingerprint_files(out_dir)
    changed = sorted(set(found) ^ set(record["files"])) + sorted(
        f for f in set(found) & set(record["files"]) if found[f] != record["files"][f])
    if changed:
        return f"{out_dir / changed[0]} changed" + (f" (and {len(changed) - 1} more files)" if len(changed) > 1 else "")
    return None


def remove_leftovers(directory: Path, recursive: bool = False) -> None:
    """Delete the temporary files an atomic write killed mid-way left in ``directory`` (``.NAME.tmp-PID``), and in
    its subfolders when ``recursive``: a folder about to be committed must never carry them."""
    for path in (directory.rglob if recursive else directory.glob)(".*.tmp-*"):
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
