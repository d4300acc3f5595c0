"""The protocol every input kind implements, rows backed by files, and the seeded stratified split.

Every input kind's module (``folders``, ``filelists``, ``digits``, ``idx``, ``imagenet``) builds on this one, and
``embeddings.sources`` chooses among them: imports run one way, from ``sources`` to the kinds to this base.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from embeddings.images import load_rgb

SPLIT_NAMES = ("train", "val", "test")
FEW_CLASSES = 256
"""Integer labels may always number classes up to this (one byte, as IDX label files hold them); beyond it, only
up to the number of rows. A label is a class number: a crafted label of 10^9 would otherwise make the class list,
and every per-class count downstream, allocate gigabytes."""


def max_classes(n_rows: int) -> int:
    """The most classes integer labels of ``n_rows`` rows may imply (``FEW_CLASSES``, or ``n_rows`` when larger)."""
    return max(FEW_CLASSES, int(n_rows))


class ImageSource:
    """The common protocol of every input kind: ``len``, ``load(i)`` and the per-row metadata."""

    kind: str
    """One of ``embeddings.sources.KINDS``."""
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

    def files(self) -> list[tuple[str, Path]]:
        """The files the rows are read from, as ``(name, path)``: what a change of content shows in
        (``embeddings.fingerprints.files_digest``). Empty for data bundled with a package."""
        return []


class FileSource(ImageSource):
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

    def files(self) -> list[tuple[str, Path]]:
        return list(zip(self.ids, self.paths))

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
    check_fractions(val_fraction, test_fraction)
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


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"--val-fraction + --test-fraction must leave rows for training, got {val_fraction} + {test_fraction}"
        )




def with_split(labels: np.ndarray, seed: int, val_fraction: float, test_fraction: float) -> dict[str, np.ndarray]:
    """The stratified split of ``labels``, or none (``{}``) when both fractions are zero."""
    if val_fraction == 0.0 and test_fraction == 0.0:
        return {}
    return stratified_split(labels, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)


def not_image_record(rel: str) -> dict:
    """The ``ignored`` record of a file that has no image extension."""
    suffix = Path(rel).suffix or "(none)"
    return {"id": rel, "reason": f"not an image file (extension {suffix})"}
