"""ImageNet as the paper splits it: a seeded hold-out of the train set as test, the official val as validation.

The folder holds ``train/<class>/...`` and ``val/<class>/...`` (the class-folder layout of both sets, as
torchvision's ``ImageFolder`` reads them). Rows are every train image, then every val image; labels are the
index of the class folder name in the sorted train classes, so that train and val share their label numbers.

Split (the paper, Section 3; the authors' code holds out 50 images per class of the train set as the test set,
50,000 in all, and tunes on the official validation set): for each class, ``n_test_per_class`` of its train
images, drawn with one generator seeded by ``seed`` in sorted class order, are ``test``; the other train images
are ``train``; every val image is ``val``. The authors' split was not seeded; this one is, and the store saves
its indices (``split.npz``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from embeddings.folders import image_folder_source
from embeddings.source_base import ImageSource

N_TEST_PER_CLASS = 50
"""Train images per class held out as the test set (the paper's 50, 50,000 on ImageNet-1k)."""


def imagenet_split(train_labels: np.ndarray, n_val: int, seed: int, n_test_per_class: int = N_TEST_PER_CLASS) -> dict:
    """``test``: ``n_test_per_class`` seeded train rows per class; ``train``: the other train rows; ``val``: rows
    ``n_train .. n_train + n_val - 1`` (the official val set). Sorted, disjoint, covering."""
    labels = np.asarray(train_labels).reshape(-1)
    rng = np.random.default_rng(seed)
    test = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        if len(rows) <= n_test_per_class:
            raise ValueError(
                f"class {label} has {len(rows)} train images; holding out {n_test_per_class} as test (the paper's "
                f"split) would leave none to train on: give every class folder of train/ more than {n_test_per_class} "
                f"images"
            )
        test.append(rng.choice(rows, size=n_test_per_class, replace=False))
    test_rows = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    train_rows = np.setdiff1d(np.arange(len(labels)), test_rows)
    n_train = len(labels)
    return {"train": train_rows.astype(np.int64), "val": np.arange(n_train, n_train + n_val, dtype=np.int64),
            "test": test_rows.astype(np.int64)}


class ImageNetSource(ImageSource):
    """``ROOT/train`` and ``ROOT/val`` class folders as one source with the paper's split."""

    kind = "imagenet"

    def __init__(self, root: str | os.PathLike, seed: int = 0, n_test_per_class: int = N_TEST_PER_CLASS,
                 max_pixels: int | None = None):
        self.root = Path(root)
        for part in ("train", "val"):
            if not (self.root / part).is_dir():
                raise FileNotFoundError(
                    f"{self.root} has no {part}/ folder: the imagenet layout is ROOT/train/<class>/ and ROOT/val/<class>/"
                )
        self.train = image_folder_source(self.root / "train", 0, 0.0, 0.0, max_pixels)
        self.val = image_folder_source(self.root / "val", 0, 0.0, 0.0, max_pixels)
        self.classes = list(self.train.classes)
        index = {name: i for i, name in enumerate(self.classes)}
        unknown = sorted(set(self.val.classes) - set(index))
        if unknown:
            raise ValueError(f"{self.root / 'val'} has class folders absent from train/: {unknown[:5]}")
        val_labels = np.array([index[self.val.classes[y]] for y in self.val.labels], dtype=np.int64)
        self.labels = np.concatenate([self.train.labels, val_labels])
        self.ids = [f"train/{i}" for i in self.train.ids] + [f"val/{i}" for i in self.val.ids]
        self.ignored = ([{**r, "id": f"train/{r['id']}"} for r in self.train.ignored]
                        + [{**r, "id": f"val/{r['id']}"} for r in self.val.ignored])
        self.seed = seed
        self.n_test_per_class = n_test_per_class
        self.split = imagenet_split(self.train.labels, len(self.val), seed, n_test_per_class)

    def load(self, i: int) -> Image.Image:
        n_train = len(self.train)
        return self.train.load(i) if i < n_train else self.val.load(i - n_train)

    def files(self) -> list[tuple[str, Path]]:
        return [(f"train/{i}", p) for i, p in self.train.files()] + [(f"val/{i}", p) for i, p in self.val.files()]

    def describe(self) -> dict:
        return {
            "kind": self.kind, "root": str(self.root.resolve()), "n": len(self), "n_classes": len(self.classes),
            "n_ignored": len(self.ignored), "seed": self.seed, "n_test_per_class": self.n_test_per_class,
            "split_rule": "n_test_per_class seeded train images per class are test; official val is val",
            **{f"n_{name}": int(len(rows)) for name, rows in self.split.items()},
        }

    def __repr__(self) -> str:
        return f"ImageNetSource(root={str(self.root)!r}, n={len(self)})"
