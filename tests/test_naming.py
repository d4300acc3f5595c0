"""Concept names: on a tiny labelled store they say exactly what the labels say; unlabelled stores and dead
concepts are described as such; concept -> images lookups equal brute force."""

import numpy as np
import pytest

from analysis.concepts.naming import ConceptNamer, describe_concepts, firing_counts, label_counts, rows_with_latents, top_rows
from analysis.spaces import codes_from_arrays

CLASSES = ["tabby cat", "ship", "tree"]


def _labelled_codes():
    """12 rows: latent c fires only on rows of label c (c = 0, 1, 2); latent 3 on every label-0 row and one
    ship; latent 4 never fires (chosen with value 0); latent 5 is never chosen."""
    labels = np.repeat([0, 1, 2], 4)
    indices, values = [], []
    for row, label in enumerate(labels):
        second = 3 if label == 0 or row == 4 else 4
        indices.append([label, second])
        values.append([2.0 + row * 0.1, 1.0 if second == 3 else 0.0])
    return codes_from_arrays(np.array(values), np.array(indices), 6), labels


def test_names_say_what_the_labels_say():
    codes, labels = _labelled_codes()
    d = {c["latent"]: c for c in describe_concepts(codes, labels, CLASSES, n_top=3)}
    assert d[0]["description"] == ("mostly 'tabby cat' (100% of 4 images); top 3: 100% 'tabby cat'; "
                                   "fires on 33.3% of images (4)")
    assert d[0]["all_labels"] == {"n": 4, "top_label": "tabby cat", "purity": 1.0, "labels": {"tabby cat": 4}}
    assert d[1]["all_labels"]["top_label"] == "ship" and d[2]["all_labels"]["purity"] == 1.0
    assert d[3]["all_labels"] == {"n": 5, "top_label": "tabby cat", "purity": 0.8,
                                  "labels": {"tabby cat": 4, "ship": 1}}
    assert d[3]["description"].startswith("mostly 'tabby cat' (80% of 5 images)")
    # Top rows: strongest first (values grow with the row here).
    assert d[0]["top_rows"] == [3, 2, 1] and d[0]["top_values"] == pytest.approx([2.3, 2.2, 2.1])
    for dead in (4, 5):
        assert d[dead]["dead"] and d[dead]["description"] == "dead: never fires on the 12 images"
        assert d[dead]["n_images"] == 0 and d[dead]["top_rows"] == []


def test_mixed_concepts_say_so():
    codes = codes_from_arrays(np.ones((4, 1)), np.zeros((4, 1)), 1)
    d = describe_concepts(codes, np.array([0, 1, 2, 0]), CLASSES)[0]
    assert d["description"].startswith("mixed, most often 'tabby cat' (50% of 4 images)")


def test_unlabelled_store_is_described_by_frequency_and_top_images():
    codes, _ = _labelled_codes()
    d = describe_concepts(codes, np.full(12, -1), [], latents=[1])[0]
    assert d["all_labels"] is None and d["top_labels"] is None
    assert d["description"] == ("fires on 33.3% of images (4); unlabelled store: described by frequency and "
                                "top images only")
    assert d["top_rows"] == [7, 6, 5, 4]


def test_counts_equal_brute_force():
    rng = np.random.default_rng(0)
    n, n_latents, k = 200, 15, 3
    indices = np.stack([rng.choice(n_latents, k, replace=False) for _ in range(n)])
    values = rng.random((n, k)) * (rng.random((n, k)) > 0.2)
    values = -np.sort(-values, axis=1)
    labels = rng.integers(-1, 4, n)
    codes = codes_from_arrays(values, indices, n_latents)
    dense = codes.dense(np.arange(n))
    np.testing.assert_array_equal(firing_counts(codes), (dense > 0).sum(0))
    expected = np.stack([((dense > 0) & (labels[:, None] == c)).sum(0) for c in range(4)], axis=1)
    np.testing.assert_array_equal(label_counts(codes, labels, 4), expected)
    for latent in range(n_latents):
        rows, vals = top_rows(codes, latent, 5)
        order = np.lexsort((np.arange(n), -dense[:, latent]))
        order = order[dense[order, latent] > 0][:5]
        np.testing.assert_array_equal(rows, order)
        np.testing.assert_allclose(vals, dense[order, latent], rtol=1e-6)
    both = rows_with_latents(codes, [1, 4])
    np.testing.assert_array_equal(both, np.flatnonzero((indices == 1).any(1) & (indices == 4).any(1)))


def test_namer_refuses_an_unknown_latent():
    codes, labels = _labelled_codes()
    with pytest.raises(ValueError, match="out of range"):
        ConceptNamer(codes, labels, CLASSES).describe(6)
    with pytest.raises(ValueError, match="at least one"):
        rows_with_latents(codes, [])


def test_labels_beyond_the_class_names_are_counted_under_their_own_number():
    """A store may hold labels without a name (``classes`` shorter than the labels): such a label is counted
    as itself, never folded into the next latent's counts."""
    codes = codes_from_arrays(np.ones((4, 1)), np.array([[0], [0], [1], [1]]), 2)
    labels = np.array([0, 2, 1, 2])
    namer = ConceptNamer(codes, labels, ["a", "b"])
    assert namer.describe(0, n_top=2)["all_labels"]["labels"] == {"a": 1, "2": 1}
    assert namer.describe(1, n_top=2)["all_labels"]["labels"] == {"2": 1, "b": 1}
