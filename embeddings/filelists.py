"""File-list inputs (``filelist``): a ``.txt`` or ``.csv`` list of image paths with optional labels.

Relative paths are resolved against the list's own folder; a name that is not valid UTF-8 keeps its bytes as
surrogate escapes, as folder ids do.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from embeddings.images import is_image_path
from embeddings.source_base import FileSource, ImageSource, max_classes, not_image_record, with_split


def _parse_txt(list_path: Path) -> list[tuple[str, str | None]]:
    """Lines are ``path`` or ``path<whitespace>label``; blank lines and ``#`` comments are skipped.

    A line that ends in an image extension is a bare path (so paths may hold spaces); otherwise a line
    with whitespace is split at its last whitespace into path and label.
    """
    entries = []
    with open(list_path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if is_image_path(line) or len(line.split()) == 1:
                entries.append((line, None))
            else:
                path, label = line.rsplit(None, 1)
                entries.append((path.strip(), label))
    return entries


def _parse_csv(list_path: Path) -> list[tuple[str, str | None]]:
    """Rows are ``path[,label]``; an optional header names the columns (``path`` required, ``label``)."""
    with open(list_path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        return []
    path_col, label_col = 0, 1
    header = [c.strip().lower() for c in rows[0]]
    if "path" in header:
        path_col = header.index("path")
        label_col = header.index("label") if "label" in header else None
        rows = rows[1:]
    entries = []
    for r in rows:
        path = r[path_col].strip() if path_col < len(r) else ""
        label = r[label_col].strip() if label_col is not None and label_col < len(r) else ""
        if not path or path.startswith("#"):
            continue
        entries.append((path, label or None))
    return entries


def _labels_from_strings(
    raw: list[str | None], classes: list[str] | None, list_path: Path
) -> tuple[np.ndarray, list[str]]:
    """Integer labels stay integers (classes ``"0".."max"``); any other label makes all of them class names."""
    given = [r for r in raw if r is not None]
    if classes is not None:
        index = {name: i for i, name in enumerate(classes)}
        out = []
        for r in raw:
            if r is None:
                out.append(-1)
            elif r in index:
                out.append(index[r])
            elif _is_int(r) and 0 <= int(r) < len(classes):
                out.append(int(r))
            else:
                raise ValueError(f"{list_path}: label {r!r} is not one of the {len(classes)} given classes")
        return np.array(out, dtype=np.int64), list(classes)
    if not given:
        return np.full(len(raw), -1, dtype=np.int64), []
    if all(_is_int(r) for r in given):
        values = [int(r) for r in given]
        if min(values) < 0:
            raise ValueError(f"{list_path}: integer labels must be >= 0, found {min(values)}")
        if max(values) >= max_classes(len(raw)):
            raise ValueError(f"{list_path}: integer label {max(values)} would imply {max(values) + 1} classes for "
                             f"{len(raw)} images; integer labels are class numbers 0..{max_classes(len(raw)) - 1} "
                             f"(or give class names)")
        labels = np.array([-1 if r is None else int(r) for r in raw], dtype=np.int64)
        return labels, [str(i) for i in range(max(values) + 1)]
    names = sorted(set(given))
    index = {name: i for i, name in enumerate(names)}
    return np.array([-1 if r is None else index[r] for r in raw], dtype=np.int64), names


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


def file_list_source(
    list_path: Path, seed: int, val_fraction: float, test_fraction: float, classes: list[str] | None, max_pixels
) -> ImageSource:
    entries = _parse_csv(list_path) if list_path.suffix.lower() == ".csv" else _parse_txt(list_path)
    base = list_path.parent
    paths, ids, raw_labels, ignored = [], [], [], []
    for path, label in entries:
        if not is_image_path(path):
            ignored.append(not_image_record(path))
            continue
        p = Path(path)
        paths.append(p if p.is_absolute() else base / p)
        ids.append(path)
        raw_labels.append(label)
    labels, class_names = _labels_from_strings(raw_labels, classes, list_path)
    settings = {"list_path": str(list_path.resolve()), "seed": seed, "val_fraction": val_fraction,
                "test_fraction": test_fraction}
    return FileSource(
        "filelist", base, paths, ids, labels, class_names,
        with_split(labels, seed, val_fraction, test_fraction), ignored, settings, max_pixels,
    )
