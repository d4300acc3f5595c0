"""Folder inputs: class sub-folders (``imagefolder``) or a tree of unlabelled images (``flat``).

Rows are every regular file with an image extension under the folder, sorted by path components; hidden files
and folders are not read but recorded in ``ignored`` (see ``embeddings.sources`` for the rules).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from embeddings.images import is_image_path
from embeddings.source_base import FileSource, ImageSource, not_image_record, with_split


def _hidden(name: str) -> bool:
    return name.startswith(".")


HIDDEN_FILE = "hidden file (name starts with '.'); not read"
HIDDEN_FOLDER = "hidden folder (name starts with '.'); its files were not read"


def walk_files(top: Path) -> tuple[list[Path], list[Path]]:
    """Every non-hidden regular file under ``top``, following links to folders but never in a loop; and the
    hidden files and folders passed over (a hidden folder once, not its contents)."""
    found: list[Path] = []
    hidden: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        hidden += [Path(dirpath) / d for d in dirnames if _hidden(d)]
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        for name in filenames:
            path = Path(dirpath) / name
            if _hidden(name):
                hidden.append(path)
            elif path.is_file():
                found.append(path)
    return found, hidden


def _hidden_record(path: Path, root: Path) -> dict:
    if path.is_dir():
        return {"id": _rel(path, root) + "/", "reason": HIDDEN_FOLDER}
    return {"id": _rel(path, root), "reason": HIDDEN_FILE}


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _sort_key(rel: str) -> tuple[str, ...]:
    # Sort by path components so that a folder's files stay together ("a/x" before "a-b/y").
    return tuple(rel.split("/"))


def _top_level(root: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """The folders, files and hidden entries directly in ``root``."""
    entries = sorted(root.iterdir())
    visible = [p for p in entries if not _hidden(p.name)]
    hidden = [p for p in entries if _hidden(p.name)]
    return [p for p in visible if p.is_dir()], [p for p in visible if p.is_file()], hidden


def guess_folder_kind(root: str | os.PathLike) -> str:
    """``"imagefolder"`` when ``root`` holds no images itself and a sub-folder holds some, else ``"flat"``."""
    root = Path(root)
    dirs, files, _ = _top_level(root)
    if any(is_image_path(f) for f in files):
        return "flat"
    for d in dirs:
        if any(is_image_path(f) for f in walk_files(d)[0]):
            return "imagefolder"
    return "flat"


def _images_under(top: Path, root: Path) -> tuple[list[tuple[str, Path]], list[dict]]:
    """The image files under ``top`` as ``(id relative to root, path)`` in sorted order, and the other files as
    ignored records."""
    rows, ignored = [], []
    files, hidden = walk_files(top)
    ignored += [_hidden_record(p, root) for p in hidden]
    for path in files:
        rel = _rel(path, root)
        if is_image_path(path):
            rows.append((rel, path))
        else:
            ignored.append(not_image_record(rel))
    rows.sort(key=lambda r: _sort_key(r[0]))
    return rows, ignored


def image_folder_source(root: Path, seed: int, val_fraction: float, test_fraction: float, max_pixels) -> ImageSource:
    dirs, files, hidden = _top_level(root)
    classes = [d.name for d in dirs]
    rows: list[tuple[str, Path]] = []
    label_list: list[int] = []
    ignored = [{"id": _rel(f, root), "reason": "outside the class folders"} for f in files]
    ignored += [_hidden_record(p, root) for p in hidden]
    for label, d in enumerate(dirs):
        class_rows, class_ignored = _images_under(d, root)
        rows += class_rows
        label_list += [label] * len(class_rows)
        ignored += class_ignored
    ignored.sort(key=lambda r: _sort_key(r["id"]))
    return _folder_source("imagefolder", root, rows, np.array(label_list, dtype=np.int64), classes, ignored,
                          seed, val_fraction, test_fraction, max_pixels)


def flat_folder_source(root: Path, seed: int, val_fraction: float, test_fraction: float, max_pixels) -> ImageSource:
    rows, ignored = _images_under(root, root)
    ignored.sort(key=lambda r: _sort_key(r["id"]))
    return _folder_source("flat", root, rows, np.full(len(rows), -1, dtype=np.int64), [], ignored,
                          seed, val_fraction, test_fraction, max_pixels)


def _folder_source(kind, root, rows, labels, classes, ignored, seed, val_fraction, test_fraction, max_pixels):
    settings = {"seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction}
    return FileSource(
        kind, root, [r[1] for r in rows], [r[0] for r in rows], labels, classes,
        with_split(labels, seed, val_fraction, test_fraction), ignored, settings, max_pixels,
    )
