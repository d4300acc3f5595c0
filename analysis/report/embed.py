"""The only way a file reaches the page: a PNG inside the run directory, embedded as a data URI.

A stage record names its plots by path, and a record can be edited by hand: a path outside the run directory
(``/etc/passwd``, ``../../secret.png``, a link inside the run that points out of it) is never read, and neither is
a file that is not a PNG. The page says which were refused and why.
"""

from __future__ import annotations

import base64
from pathlib import Path

from PIL import Image

from analysis.figures import min_font_px

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_BYTES = 16 << 20
"""A larger file is not embedded (a report is one page)."""


def inside_run_dir(run_dir: Path, path) -> Path | None:
    """``path`` (relative to ``run_dir`` unless absolute) resolved, when it is a file inside ``run_dir``; None for
    anything else (outside, through a link that leaves it, missing)."""
    try:
        p = Path(path)
        resolved = (p if p.is_absolute() else Path(run_dir) / p).resolve(strict=True)
        root = Path(run_dir).resolve(strict=True)
    except (OSError, RuntimeError, TypeError, ValueError):
        return None
    return resolved if resolved.is_relative_to(root) and resolved.is_file() else None


def embed_png(run_dir: Path | None, rel) -> dict:
    """``{"uri", "width", "height", "min_font_px", "reason"}`` of the PNG at ``rel`` (relative to ``run_dir``):
    ``uri`` None and ``reason`` set when it is missing, outside the run directory or not a PNG."""
    none = {"uri": None, "width": None, "height": None, "min_font_px": None}
    if run_dir is None or not rel:
        return {**none, "reason": "no image"}
    path = inside_run_dir(run_dir, rel)
    if path is None:
        outside = not _would_be_inside(run_dir, rel)
        return {**none, "reason": f"{rel}: " + ("outside the run directory, never embedded" if outside
                                                else "missing")}
    data = path.read_bytes()[: MAX_PNG_BYTES + 1]
    if not data.startswith(PNG_SIGNATURE) or len(data) > MAX_PNG_BYTES:
        return {**none, "reason": f"{rel}: not a PNG of at most {MAX_PNG_BYTES >> 20} MiB, not embedded"}
    try:
        with Image.open(path) as im:
            width, height = im.size
    except OSError as e:
        return {**none, "reason": f"{rel}: unreadable PNG ({e})"}
    return {"uri": "data:image/png;base64," + base64.b64encode(data).decode("ascii"), "width": width,
            "height": height, "min_font_px": min_font_px(path), "reason": None}


def _would_be_inside(run_dir: Path, rel) -> bool:
    try:
        p = Path(rel)
        return (p if p.is_absolute() else Path(run_dir) / p).resolve().is_relative_to(Path(run_dir).resolve())
    except (OSError, RuntimeError, TypeError, ValueError):
        return False
