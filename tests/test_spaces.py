"""The three spaces: rows on demand equal the store, the SAE's reconstructions and the dense codes; code space
stays sparse; a space can be indexed like an array."""

import numpy as np
import pytest
import torch

from analysis.neighbours import NeighbourIndex
from analysis.spaces import code_space, codes_from_arrays, embedding_space, make_space, reconstruction_space
from embeddings.store import EmbeddingStore
from sae.checkpoint import load_sae
from sae.codes import CodeStore
from synthetic_concepts import planted_artifacts


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    store_dir, sae_dir, codes_dir = planted_artifacts(tmp_path_factory.mktemp("spaces"))
    return EmbeddingStore.open(store_dir), load_sae(sae_dir), CodeStore.open(codes_dir)


def test_embedding_rows_in_the_order_asked_with_repeats(artifacts):
    store, _, _ = artifacts
    rows = np.array([7, 3, 7, 0, 150])
    space = embedding_space(store)
    np.testing.assert_array_equal(space.rows(rows), np.asarray(store.x)[rows])
    assert (space.name, space.n, space.dim) == ("embeddings", store.n, store.d)
    with pytest.raises(IndexError, match="out of range"):
        space.rows([store.n])


def test_reconstructions_are_the_sae_forward(artifacts):
    store, sae, _ = artifacts
    rows = np.array([5, 1, 99])
    with torch.no_grad():
        expected = sae(torch.from_numpy(np.asarray(store.x)[rows])).recon.numpy()
    np.testing.assert_allclose(reconstruction_space(store, sae).rows(rows), expected, rtol=1e-5, atol=1e-5)


def test_code_space_dense_rows_and_sparse_view_without_a_copy(artifacts):
    _, _, codes = artifacts
    space = code_space(codes)
    rows = np.array([2, 40, 2])
    np.testing.assert_array_equal(space.rows(rows), codes.dense(rows))
    every = space.sparse()
    # The whole CodeStore as SparseCodes is its memory maps, not a copy (and never dense).
    assert every.values is codes.values and every.indices is codes.indices
    np.testing.assert_array_equal(space.sparse(rows).indices, np.asarray(codes.indices)[rows])
    with pytest.raises(ValueError, match="dense"):
        embedding_space(EmbeddingStore.open(codes.meta["parents"]["store_dir"])).sparse()


def test_a_space_fits_like_an_array_with_a_split(artifacts):
    store, _, _ = artifacts
    space = embedding_space(store)
    train = store.split["train"]
    rows = NeighbourIndex().fit(space, rows=train).search(space.rows([0, 1]), 4)[1]
    expected = NeighbourIndex().fit(np.asarray(store.x), rows=train).search(np.asarray(store.x)[:2], 4)[1]
    np.testing.assert_array_equal(rows, expected)


def test_codes_from_arrays_builds_the_inverted_lists(artifacts):
    _, _, codes = artifacts
    copy = codes_from_arrays(np.asarray(codes.values), np.asarray(codes.indices), codes.n_latents)
    np.testing.assert_array_equal(copy.inv_indptr, codes.inv_indptr)
    np.testing.assert_array_equal(copy.inv_rows, codes.inv_rows)


def test_make_space_names_what_is_missing(artifacts):
    store, _, _ = artifacts
    with pytest.raises(ValueError, match="--sae"):
        make_space("reconstructions", store, None, None)
    with pytest.raises(ValueError, match="--codes"):
        make_space("codes", store, None, None)
    with pytest.raises(ValueError, match="--space"):
        make_space("pixels", store, None, None)
