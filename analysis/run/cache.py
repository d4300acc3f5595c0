"""The stage cache of a run directory: every stage is keyed by a content hash of its inputs and settings.

A run is a chain of stages (backbone → store → SAE → codes → studies → report). Each stage writes one
directory ``RUN_DIR/<stage>/`` and, once that directory is complete, a record ``RUN_DIR/stages/<stage>.json``:

    {"stage", "key", "version", "settings", "parents": {name: key}, "result", "seconds", "cpu_seconds",
     "finished_at"}

``key`` is the SHA-256 of the stage's name, version, settings and the keys of its parents, so it changes when
any setting upstream changes (a Merkle chain). On a rerun:

- record present with the same key and its directory present: the stage is reused (``reusing``);
- record with another key: the settings or parents that changed are printed, the old directory is removed and
  the stage reruns; every stage downstream then has a new key too, and reruns for the same reason;
- directory without a record, or no directory: the stage (re)runs. A stage killed mid-way leaves its partial
  directory (``.NAME.partial``, and ``.NAME.resume`` for checkpoints kept apart) beside it; its
  ``stages/<stage>.pending.json`` names the key it was run with, so a resumable stage (extraction, SAE training,
  the TTT evaluation) continues it only when the key is the same, and it is cleared otherwise.

The record is written last and atomically, so a record always describes a complete directory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from artifacts import ArtifactError, package_version, partial_dir, read_json, settings_differences, write_json

RECORDS_DIRNAME = "stages"


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
        self.records_dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.results: dict[str, StageResult] = {}

    def record_path(self, name: str) -> Path:
        return self.records_dir / f"{name}.json"

    def run(self, stage: Stage) -> StageResult:
        """Reuse or compute ``stage``; its parents must have run in this cache already."""
        missing = [p for p in stage.parents if p not in self.results]
        if missing:
            raise ValueError(f"stage {stage.name!r} needs {missing} to run first")
        parents = {p: self.results[p].key for p in stage.parents}
        key = stage_key(stage.name, stage.version, stage.settings, parents)
        out_dir = self.run_dir / stage.name
        reused = self._reusable(stage, key, parents, out_dir)
        if reused is not None:
            self.results[stage.name] = reused
            self.log(f"{stage.name}: reusing {out_dir} (key {key[:12]}, computed in {reused.seconds:.1f} s)")
            return reused
        self._prepare(stage.name, key, out_dir)
        t0, c0 = time.perf_counter(), time.process_time()
        result = stage.run(out_dir, {p: self.results[p] for p in stage.parents})
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        if not out_dir.is_dir():
            raise ArtifactError(f"stage {stage.name!r} finished without writing {out_dir}")
        write_json(self.record_path(stage.name), {
            "stage": stage.name, "key": key, "version": stage.version, "settings": stage.settings,
            "parents": parents, "result": result, "seconds": seconds, "cpu_seconds": cpu,
            "package_version": package_version(),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
        self._pending_path(stage.name).unlink(missing_ok=True)
        done = StageResult(stage.name, key, out_dir, result, seconds, False, stage.settings, cpu)
        self.results[stage.name] = done
        self.log(f"{stage.name}: done in {seconds:.1f} s ({cpu:.1f} s CPU)")
        return done

    def _reusable(self, stage: Stage, key: str, parents: dict, out_dir: Path) -> StageResult | None:
        path = self.record_path(stage.name)
        if not path.is_file():
            if out_dir.exists():
                self.log(f"{stage.name}: {out_dir} has no completion record (an interrupted run); rebuilding it")
            return None
        try:
            record = read_json(path)
        except ArtifactError:
            self.log(f"{stage.name}: its record {path} is unreadable; rebuilding the stage")
            return None
        if record.get("key") == key and out_dir.is_dir():
            return StageResult(stage.name, key, out_dir, record.get("result") or {}, float(record.get("seconds", 0.0)),
                               True, stage.settings, record.get("cpu_seconds"))
        if record.get("key") == key:
            self.log(f"{stage.name}: {out_dir} is missing; rebuilding it")
        else:
            self.log(f"{stage.name}: {_why_changed(stage, record, parents)}; rerunning it")
        return None

    def _pending_path(self, name: str) -> Path:
        return self.records_dir / f"{name}.pending.json"

    def _prepare(self, name: str, key: str, out_dir: Path) -> None:
        """Clear what an earlier run left that does not belong to ``key``; keep a partial directory of the same key
        (a resumable stage continues it)."""
        self.record_path(name).unlink(missing_ok=True)
        if out_dir.is_dir():
            shutil.rmtree(out_dir)
        elif out_dir.exists():
            raise ArtifactError(f"{out_dir} is a file, not a stage directory; move it away and rerun")
        pending = self._pending_path(name)
        same = pending.is_file() and _read_key(pending) == key
        if not same:
            shutil.rmtree(partial_dir(out_dir), ignore_errors=True)
            shutil.rmtree(resume_dir(out_dir), ignore_errors=True)
        write_json(pending, {"stage": name, "key": key})


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
