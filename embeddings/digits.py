"""The bundled default data set: scikit-learn's 1,797 handwritten digits as 32x32 images.

scikit-learn ships the digits (8x8, grey levels 0..16) inside the package, so nothing is downloaded.
Here they become real images a CNN can use:

- grey levels 0..16 are rescaled to 0..255 and the 8x8 grid is upsampled bilinearly (Pillow) to
  ``size x size`` (32 by default). Bilinear, not nearest, so that the strokes are smooth rather than
  blocks of 4x4 pixels. Ink is bright on black, the MNIST convention of the paper's CNN experiments;
- labels 0..9, class names ``"0".."9"``, ids the dataset index as a string;
- a seeded split stratified by digit, 60/20/20 train/val/test by default. The paper's MNIST split is
  50k/10k/10k (about 71/14/14); with only 1,797 images a larger share for val and test keeps their
  accuracies from resting on a handful of errors (about 360 images each).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from embeddings.source_base import ImageSource, stratified_split

DIGITS_SIZE = 32
"""Default side length of the upsampled digit images."""
DIGITS_VAL_FRACTION = 0.2
"""Default share of each digit held out for validation."""
DIGITS_TEST_FRACTION = 0.2
"""Default share of each digit held out for testing."""
DIGITS_CLASSES = [str(i) for i in range(10)]
"""Class names of the digits, indexed by label."""


@lru_cache(maxsize=4)
def _digits_cached(size: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    grey = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (n, 8, 8), 0..255
    if size == 8:
        images = grey
    else:
        images = np.stack(
            [np.asarray(Image.fromarray(g).resize((size, size), Image.Resampling.BILINEAR)) for g in grey]
        )
    labels = bunch.target.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_digits_images(size: int = DIGITS_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The digits as ``(1797, size, size)`` uint8 images (ink bright) and ``(1797,)`` int64 labels 0..9.

    The arrays are cached and read-only; copy them before changing them.
    """
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"digit image size must be an integer >= 8, got {size!r}")
    return _digits_cached(size)


def digits_split(
    labels: np.ndarray,
    seed: int = 0,
    val_fraction: float = DIGITS_VAL_FRACTION,
    test_fraction: float = DIGITS_TEST_FRACTION,
) -> dict[str, np.ndarray]:
    """The seeded, digit-stratified ``train``/``val``/``test`` row indices (sorted, disjoint, covering)."""
    return stratified_split(labels, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)


class DigitsSource(ImageSource):
    """The digits as an ``ImageSource``: row ``i`` is digit ``i`` as an RGB image (grey in all channels)."""

    kind = "digits"

    def __init__(
        self,
        seed: int = 0,
        size: int = DIGITS_SIZE,
        val_fraction: float = DIGITS_VAL_FRACTION,
        test_fraction: float = DIGITS_TEST_FRACTION,
    ):
        self.images, self.labels = load_digits_images(size)
        self.size = size
        self.seed = seed
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.ids = [str(i) for i in range(len(self.labels))]
        self.classes = list(DIGITS_CLASSES)
        self.split = digits_split(self.labels, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
        self.ignored = []

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i]).convert("RGB")

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "root": "sklearn.datasets.load_digits",
            "n": len(self),
            "n_classes": len(self.classes),
            "size": self.size,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            **{f"n_{name}": int(len(rows)) for name, rows in self.split.items()},
        }

    def __repr__(self) -> str:
        return f"DigitsSource(n={len(self)}, size={self.size}, seed={self.seed})"
