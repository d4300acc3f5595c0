"""Image sources: the row order, ids, labels, classes and split of every input kind, and how to read row i.

Kinds:

- ``digits``: the bundled scikit-learn digits (see ``embeddings.digits``); always has its split.
- ``imagefolder``: a directory whose sub-folders are classes (``ROOT/<class>/**/<image>``, the layout of
  ImageNet train/val). Every non-hidden sub-folder is a class, in sorted name order, so that two folders
  with the same class folders give the same labels even when one class is empty there.
- ``flat``: a directory of images without labels, searched recursively.
- ``filelist``: a ``.txt`` or ``.csv`` list of image paths with optional labels; relative paths are
  resolved against the list's own folder.

Rows are every regular file with an image extension (``images.IMAGE_EXTENSIONS``, any case), sorted,
whether or not it decodes: a damaged file keeps its row so that extraction records it as skipped with
the reason ``load`` gives. Regular files without an image extension are not rows; they are listed in
``ignored`` as ``{"id", "reason"}`` records (the shape of a store's ``skipped.json``). Hidden files and
folders (names starting with ``.``) are not read; each is listed in ``ignored`` too (a hidden folder once,
with a trailing ``/``), so that every entry of the input is accounted for.

Ids are the names as the file system gives them: a name that is not valid UTF-8 (bytes ``caf\\xe9.jpg``) keeps
its bytes as Python's surrogate escapes (``os.fsdecode``), which ``os.fsencode`` turns back into the exact
name, and which ``ids.json`` stores as JSON ``\\udcXX`` escapes. File lists are read the same way.

A directory is an ``imagefolder`` when it holds no images itself and at least one sub-folder holds
images; otherwise it is ``flat``. ``kind=`` overrides the guess.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
from PIL import Image

from embeddings.images import BadImage, is_image_path, load_rgb

KINDS = ("digits", "imagefolder", "flat", "filelist", "idx", "imagenet")
SPLIT_NAMES = ("train", "val", "test")


class ImageSource:
    """The common protocol of every input kind: ``len``, ``load(i)`` and the per-row metadata."""

    kind: str
    """``"digits"``, ``"imagefolder"``, ``"flat"`` or ``"filelist"``."""
    ids: list[str]
    """One id per row: the path relative to the root (folders, lists) or the dataset index (digits)."""
    labels: np.ndarray
    """``(n,)`` int64 labels, -1 where unknown."""
    classes: list[str]
    """Class names indexed by label; empty when the source is unlabelled."""
    split: dict[str, np.ndarray]
    """Sorted row indices of ``train``/``val``/``test`` when the source defines a split, else empty."""
    ignored: list[dict]
    """Files that are not rows (no image extension, outside class folders), as ``{"id", "reason"}``."""

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int) -> Image.Image:
        """Row ``i`` as an 8-bit RGB image; raises ``BadImage`` with a reason when it can't be read."""
        raise NotImplementedError

    def describe(self) -> dict:
        """A JSON-able description of the source for ``config.json``."""
        raise NotImplementedError


class _FileSource(ImageSource):
    """Rows backed by files: ``paths[i]`` is read with ``images.load_rgb``."""

    def __init__(self, kind, root, paths, ids, labels, classes, split, ignored, settings, max_pixels=None):
        self.kind = kind
        self.root = Path(root)
        self.paths = [Path(p) for p in paths]
        self.ids = list(ids)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.classes = list(classes)
        self.split = split
        self.ignored = list(ignored)
        self.max_pixels = max_pixels
        self._settings = settings
        assert len(self.paths) == len(self.ids) == len(self.labels)

    def load(self, i: int) -> Image.Image:
        return load_rgb(self.paths[i], max_pixels=self.max_pixels)

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "root": str(self.root.resolve()),
            "n": len(self),
            "n_classes": len(self.classes),
            "n_ignored": len(self.ignored),
            **{f"n_{name}": int(len(rows)) for name, rows in self.split.items()},
            **self._settings,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, root={str(self.root)!r}, n={len(self)})"


def stratified_split(
    labels: np.ndarray, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2
) -> dict[str, np.ndarray]:
    """A seeded split of rows into ``train``/``val``/``test``, stratified by label.

    Each label (unknown ``-1`` counts as one) is shuffled with one generator seeded by ``seed``, visited
    in sorted label order, and gives ``round(n_label * fraction)`` rows to val and to test; the rest
    train. The three index arrays are sorted, disjoint and together cover every row; they depend only
    on the labels and the seed.
    """
    labels = np.asarray(labels).reshape(-1)
    _check_fractions(val_fraction, test_fraction)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_NAMES}
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(rows) * test_fraction))
        n_val = int(round(len(rows) * val_fraction))
        n_val = min(n_val, len(rows) - n_test)
        parts["test"].append(rows[:n_test])
        parts["val"].append(rows[n_test : n_test + n_val])
        parts["train"].append(rows[n_test + n_val :])
    return {
        name: np.sort(np.concatenate(chunks)).astype(np.int64) if chunks else np.zeros(0, np.int64)
        for name, chunks in parts.items()
    }


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"--val-fraction + --test-fraction must leave rows for training, got {val_fraction} + {test_fraction}"
        )


def _hidden(name: str) -> bool:
    return name.startswith(".")


HIDDEN_FILE = "hidden file (name starts with '.'); not read"
HIDDEN_FOLDER = "hidden folder (name starts with '.'); its files were not read"


def _walk_files(top: Path) -> tuple[list[Path], list[Path]]:
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


def _not_image(rel: str) -> dict:
    suffix = Path(rel).suffix or "(none)"
    return {"id": rel, "reason": f"not an image file (extension {suffix})"}


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
        if any(is_image_path(f) for f in _walk_files(d)[0]):
            return "imagefolder"
    return "flat"


def _with_split(labels, split_seed, val_fraction, test_fraction):
    if val_fraction == 0.0 and test_fraction == 0.0:
        return {}
    return stratified_split(labels, seed=split_seed, val_fraction=val_fraction, test_fraction=test_fraction)


def _images_under(top: Path, root: Path) -> tuple[list[tuple[str, Path]], list[dict]]:
    """The image files under ``top`` as ``(id relative to root, path)`` in sorted order, and the other files as
    ignored records."""
    rows, ignored = [], []
    files, hidden = _walk_files(top)
    ignored += [_hidden_record(p, root) for p in hidden]
    for path in files:
        rel = _rel(path, root)
        if is_image_path(path):
            rows.append((rel, path))
        else:
            ignored.append(_not_image(rel))
    rows.sort(key=lambda r: _sort_key(r[0]))
    return rows, ignored


def _image_folder(root: Path, seed: int, val_fraction: float, test_fraction: float, max_pixels) -> ImageSource:
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


def _flat_folder(root: Path, seed: int, val_fraction: float, test_fraction: float, max_pixels) -> ImageSource:
    rows, ignored = _images_under(root, root)
    ignored.sort(key=lambda r: _sort_key(r["id"]))
    return _folder_source("flat", root, rows, np.full(len(rows), -1, dtype=np.int64), [], ignored,
                          seed, val_fraction, test_fraction, max_pixels)


def _folder_source(kind, root, rows, labels, classes, ignored, seed, val_fraction, test_fraction, max_pixels):
    settings = {"seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction}
    return _FileSource(
        kind, root, [r[1] for r in rows], [r[0] for r in rows], labels, classes,
        _with_split(labels, seed, val_fraction, test_fraction), ignored, settings, max_pixels,
    )


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


def _file_list(
    list_path: Path, seed: int, val_fraction: float, test_fraction: float, classes: list[str] | None, max_pixels
) -> ImageSource:
    entries = _parse_csv(list_path) if list_path.suffix.lower() == ".csv" else _parse_txt(list_path)
    base = list_path.parent
    paths, ids, raw_labels, ignored = [], [], [], []
    for path, label in entries:
        if not is_image_path(path):
            ignored.append(_not_image(path))
            continue
        p = Path(path)
        paths.append(p if p.is_absolute() else base / p)
        ids.append(path)
        raw_labels.append(label)
    labels, class_names = _labels_from_strings(raw_labels, classes, list_path)
    settings = {"list_path": str(list_path.resolve()), "seed": seed, "val_fraction": val_fraction,
                "test_fraction": test_fraction}
    return _FileSource(
        "filelist", base, paths, ids, labels, class_names,
        _with_split(labels, seed, val_fraction, test_fraction), ignored, settings, max_pixels,
    )


def open_source(
    spec: str | os.PathLike,
    kind: str = "auto",
    seed: int = 0,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    classes: list[str] | None = None,
    max_pixels: int | None = None,
) -> ImageSource:
    """Open an input by its spec: ``"digits"``, a folder, or a ``.txt``/``.csv`` file list.

    ``kind`` forces ``"imagefolder"``, ``"flat"`` or ``"filelist"`` instead of guessing. ``seed``,
    ``val_fraction`` and ``test_fraction`` set the stratified split: folders and lists have none unless a
    fraction is given; digits always has one (default 60/20/20). ``classes`` pins the class names of a
    labelled file list (so that a train list and a val list share their label numbers).
    ``max_pixels`` overrides the decompression-bomb limit of ``images.load_rgb``.
    """
    if kind not in ("auto",) + KINDS:
        raise ValueError(f"--kind must be one of auto, {', '.join(KINDS)}; got {kind!r}")
    spec_str = str(spec)
    if kind == "digits" or (kind == "auto" and spec_str == "digits"):
        from embeddings.digits import DigitsSource  # digits builds on this module's split

        kwargs = {k: v for k, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)) if v is not None}
        return DigitsSource(seed=seed, **kwargs)
    if kind == "idx":  # MNIST-format files (embeddings.idx), with the paper's split
        from embeddings.idx import IdxSource

        return IdxSource(spec_str, seed=seed, val_fraction=val_fraction)
    if kind == "imagenet":  # train/ and val/ class folders (embeddings.imagenet), with the paper's split
        from embeddings.imagenet import ImageNetSource

        return ImageNetSource(spec_str, seed=seed, max_pixels=max_pixels)
    val_fraction = 0.0 if val_fraction is None else float(val_fraction)
    test_fraction = 0.0 if test_fraction is None else float(test_fraction)
    _check_fractions(val_fraction, test_fraction)
    path = Path(spec_str).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"input {spec_str!r} does not exist; pass 'digits', an image folder, or a .txt/.csv file list"
        )
    if path.is_dir():
        if kind == "filelist":
            raise ValueError(f"--kind filelist needs a .txt or .csv file, but {path} is a folder")
        if kind == "auto":
            kind = guess_folder_kind(path)
        if kind == "imagefolder":
            return _image_folder(path, seed, val_fraction, test_fraction, max_pixels)
        return _flat_folder(path, seed, val_fraction, test_fraction, max_pixels)
    if kind in ("auto", "filelist"):
        if path.suffix.lower() not in (".txt", ".csv") and kind == "auto":
            raise ValueError(f"input file {path} is not a .txt or .csv file list; pass --kind filelist to read it as one")
        return _file_list(path, seed, val_fraction, test_fraction, classes, max_pixels)
    raise ValueError(f"--kind {kind} needs a folder, but {path} is a file")


__all__ = ["BadImage", "ImageSource", "KINDS", "guess_folder_kind", "open_source", "stratified_split"]
