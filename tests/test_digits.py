"""The bundled digits data set: real images, labels, and a seeded stratified split."""

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from embeddings.digits import DIGITS_CLASSES, DigitsSource, digits_split, load_digits_images
from embeddings.sources import open_source


def test_images_and_labels():
    images, labels = load_digits_images()
    assert images.shape == (1797, 32, 32) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.int64
    assert sorted(np.unique(labels).tolist()) == list(range(10))
    assert images.min() == 0 and images.max() == 255
    assert not images.flags.writeable and not labels.flags.writeable


def test_the_8x8_grid_is_sklearns_digits_rescaled_and_the_upsampling_keeps_them():
    raw = load_digits()
    small, labels = load_digits_images(8)
    np.testing.assert_array_equal(small, np.rint(raw.images * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(labels, raw.target)
    big, _ = load_digits_images(32)
    # Shrinking the 32x32 image back to 8x8 gives the original digit, not a flipped or shifted one.
    for i in (0, 1, 100, 1796):
        back = np.asarray(Image.fromarray(big[i]).resize((8, 8), Image.Resampling.BOX), dtype=float)
        assert np.corrcoef(back.ravel(), small[i].ravel().astype(float))[0, 1] > 0.95


def test_bad_size():
    with pytest.raises(ValueError, match="size"):
        load_digits_images(4)


def test_default_split_is_60_20_20_stratified_disjoint_covering():
    _, labels = load_digits_images()
    split = digits_split(labels, seed=0)
    assert {k: len(v) for k, v in split.items()} == {"train": 1079, "val": 359, "test": 359}
    rows = np.concatenate([split["train"], split["val"], split["test"]])
    assert sorted(rows.tolist()) == list(range(1797))
    for c in range(10):
        n_c = np.sum(labels == c)
        for name, fraction in (("val", 0.2), ("test", 0.2)):
            assert np.sum(labels[split[name]] == c) == round(n_c * fraction)


def test_split_is_seeded():
    _, labels = load_digits_images()
    a, b, c = digits_split(labels, seed=7), digits_split(labels, seed=7), digits_split(labels, seed=8)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])


def test_digits_source():
    src = open_source("digits", seed=2)
    images, labels = load_digits_images()
    assert isinstance(src, DigitsSource) and src.kind == "digits" and len(src) == 1797
    assert src.ids[:3] == ["0", "1", "2"] and src.classes == DIGITS_CLASSES
    np.testing.assert_array_equal(src.labels, labels)
    expected = digits_split(labels, seed=2)
    assert all(np.array_equal(src.split[k], expected[k]) for k in expected)
    img = src.load(5)
    assert img.mode == "RGB" and img.size == (32, 32)
    a = np.asarray(img)
    for ch in range(3):
        np.testing.assert_array_equal(a[..., ch], images[5])
    desc = src.describe()
    json.dumps(desc)
    assert desc["kind"] == "digits" and desc["seed"] == 2 and desc["n_test"] == 359 and src.ignored == []


def test_digits_source_custom_fractions():
    src = open_source("digits", val_fraction=0.1, test_fraction=0.3)
    assert len(src.split["val"]) == pytest.approx(180, abs=5) and len(src.split["test"]) == pytest.approx(539, abs=5)
