"""Reuse of a finished artifact only when it was made with the settings asked for now.

A pipeline that skips a stage whose artifact exists must first compare the settings recorded in that artifact
(``config.json``, or ``meta.json`` for parent hashes) with the settings of the current request: an artifact
made with other settings is refused by name, or rebuilt by the caller, never silently reused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from artifacts.errors import ArtifactError
from artifacts.io import read_json

_ABSENT = "<absent>"


def _canonical(obj: Any) -> Any:
    """``obj`` as JSON would give it back (tuples become lists, keys strings), so that a value compares equal to
    its own record."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def settings_differences(recorded: Any, requested: Any, prefix: str = "") -> list[str]:
    """The settings in ``requested`` whose value differs from ``recorded``, as ``"name: recorded R, requested Q"``.

    Only the keys of ``requested`` are compared, recursively through nested dicts: a record may hold more (a
    resolved plan, metrics) without making a difference. ``1`` and ``1.0`` are equal.
    """
    recorded, requested = _canonical(recorded), _canonical(requested)
    if isinstance(requested, dict) and isinstance(recorded, dict):
        out = []
        for key in sorted(requested):
            name = f"{prefix}{key}"
            if key not in recorded:
                out.append(f"{name}: recorded {_ABSENT}, requested {_short(requested[key])}")
            else:
                out += settings_differences(recorded[key], requested[key], f"{name}.")
        return out
    if recorded != requested:
        return [f"{prefix.rstrip('.') or 'settings'}: recorded {_short(recorded)}, requested {_short(requested)}"]
    return []


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_settings(
    artifact_dir: str | os.PathLike,
    requested: dict,
    *,
    file: str = "config.json",
    fix: str = "choose another --out, or pass --overwrite to rebuild it with the requested settings",
) -> None:
    """Refuse to reuse ``artifact_dir`` when its ``file`` records settings other than ``requested``.

    Raises ``ArtifactError`` naming the artifact, every differing setting (recorded and requested value) and
    ``fix``; returns quietly when every requested setting matches its record.
    """
    path = Path(artifact_dir) / file
    recorded = read_json(path)
    diffs = settings_differences(recorded, requested)
    if diffs:
        raise ArtifactError(
            f"{Path(artifact_dir)} was made with other settings than requested ({'; '.join(diffs[:8])}"
            f"{'; ...' if len(diffs) > 8 else ''}; recorded in {path}); {fix}"
        )
