"""Concept sharing: the vectorised statistics equal their plain twin and stay within their bounds; planted local
structure shares far fewer concepts than random neighbourhoods and isotropic data does not; baselines; O1; the
concept study's keys."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis import neighbourhoods as nbh
from analysis.neighbours import NeighbourIndex, SparseCodes
from analysis.concepts.sharing import ConceptConfig, concept_study, find_neighbours, study_rows
from analysis.spaces import embedding_space
from embeddings.store import EmbeddingStore, write_store
from sae.checkpoint import load_sae
from sae.codes import CodeStore
from synthetic_concepts import planted_artifacts, planted_codes, planted_embeddings, random_codes


@settings(max_examples=30, deadline=None)
@given(st.integers(10, 60), st.integers(3, 50), st.integers(1, 5), st.integers(1, 9), st.integers(0, 10_000))
def test_vectorised_stats_equal_the_reference_and_their_bounds(n, n_latents, k, n_nb, seed):
    rng = np.random.default_rng(seed)
    k, n_nb = min(k, n_latents), min(n_nb, n - 1)
    codes = random_codes(rng, n, n_latents, k, p_zero=0.3)
    queries = rng.choice(n, 7)
    neighbours = nbh.random_neighbourhoods(np.arange(n), queries, n_nb, seed)
    fast = nbh.neighbourhood_stats(codes, neighbours, queries)
    ref = nbh.neighbourhood_stats_reference(codes, neighbours, queries)
    for name in nbh.STAT_NAMES:
        np.testing.assert_allclose(fast[name], ref[name], atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(nbh.union_sizes(codes, neighbours), ref["union"])
    n_active = (codes.values[neighbours] > 0).sum(2)
    assert (fast["union"] >= n_active.max(1)).all() and (fast["union"] <= n_nb * k).all()
    assert (fast["union"] <= n_latents).all()
    assert ((0 <= fast["jaccard"]) & (fast["jaccard"] <= 1)).all()
    assert (fast["mass50"] <= fast["mass90"]).all() and (fast["mass90"] <= fast["union"]).all()
    assert ((0 <= fast["query_shared"]) & (fast["query_shared"] <= 1)).all()


def test_stats_stay_exact_when_latent_ids_times_entries_pass_int32():
    """The packed sort keys (latent × entries per neighbourhood + entry) outgrow int32 for wide SAEs and large
    neighbourhoods (65536 latents × 50 neighbours × k 64 = 2^31 + ...): they must not wrap around."""
    n_latents = 2**30
    codes = SparseCodes(np.array([[3.0, 2.0], [1.0, 4.0], [5.0, 1.0]], np.float32),
                        np.array([[n_latents - 1, n_latents - 2], [n_latents - 1, 5], [7, 8]]), n_latents)
    neighbours, queries = np.array([[0, 1], [1, 2]]), np.array([2, 0])
    got = nbh.neighbourhood_stats(codes, neighbours, queries)
    want = nbh.neighbourhood_stats_reference(codes, neighbours, queries)
    for name in nbh.STAT_NAMES:
        np.testing.assert_allclose(got[name], want[name], err_msg=name)
    assert got["query_shared"][1] == 0.25


def test_identical_and_disjoint_neighbourhoods_hit_the_bounds():
    k = 3
    same = SparseCodes(np.ones((5, k), np.float32), np.tile(np.arange(k), (5, 1)), 20)
    stats = nbh.neighbourhood_stats(same, np.array([[1, 2, 3, 4]]), np.array([0]))
    assert stats["union"][0] == k and stats["jaccard"][0] == 1.0 and stats["query_shared"][0] == 1.0
    apart = SparseCodes(np.ones((5, k), np.float32), np.arange(15).reshape(5, k), 20)
    stats = nbh.neighbourhood_stats(apart, np.array([[1, 2, 3, 4]]), np.array([0]))
    assert stats["union"][0] == 4 * k and stats["jaccard"][0] == 0.0 and stats["query_shared"][0] == 0.0


def _real_and_random_unions(isotropic: bool):
    codes, labels = planted_codes(n_per_class=60, n_classes=6, per_class=5, k=3, isotropic=isotropic, seed=1)
    if isotropic:  # embeddings that carry no concept structure at all
        x = np.random.default_rng(2).normal(size=(codes.n, 16)).astype(np.float32)
    else:
        x, _ = planted_embeddings(codes, seed=1)
    queries = np.arange(0, codes.n, 3)
    neighbours = NeighbourIndex().fit(x).search(x[queries], 10, exclude=queries)[1]
    real = nbh.neighbourhood_stats(codes, neighbours)["union"]
    random = nbh.neighbourhood_stats(codes, nbh.random_neighbourhoods(np.arange(codes.n), queries, 10))["union"]
    return real, random


def test_planted_local_structure_shares_far_fewer_concepts_than_random():
    real, random = _real_and_random_unions(isotropic=False)
    assert real.mean() < 0.5 * random.mean()


def test_isotropic_data_shares_as_many_concepts_as_random():
    real, random = _real_and_random_unions(isotropic=True)
    se = np.sqrt(real.var(ddof=1) / real.size + random.var(ddof=1) / random.size)
    assert abs(real.mean() - random.mean()) < 4 * se


def test_baselines_are_distinct_never_the_query_and_same_label():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    pool = np.arange(0, 300, 2)
    queries = np.arange(0, 60, 2)  # drawn from the pool: never their own neighbour
    for rows in (nbh.random_neighbourhoods(pool, queries, 20, 1),
                 nbh.same_label_neighbourhoods(pool, labels, queries, 20, 1)):
        assert rows.shape == (30, 20) and np.isin(rows, pool).all()
        assert all(len(set(r)) == 20 for r in rows.tolist())
        assert not (rows == queries[:, None]).any()
    same = nbh.same_label_neighbourhoods(pool, labels, queries, 20, 1)
    assert (labels[same] == labels[queries][:, None]).all()
    with pytest.raises(ValueError, match="--n-neighbours"):
        nbh.random_neighbourhoods(np.arange(10), np.arange(3), 10)


def test_code_cosines_equal_the_dense_cosines():
    rng = np.random.default_rng(3)
    codes = random_codes(rng, 80, 30, 4, p_zero=0.0)
    queries = np.arange(12)
    neighbours = rng.integers(0, 80, (12, 9))
    dense = codes.dense()
    dense /= np.linalg.norm(dense, axis=1, keepdims=True)
    expected = np.einsum("md,mnd->mn", dense[queries], dense[neighbours])
    np.testing.assert_allclose(nbh.code_cosines(codes, queries, neighbours, batch=5), expected, atol=1e-6)


def test_neighbour_overlap():
    a = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    b = np.array([[4, 9, 1, 0], [8, 7, 6, 5]])
    np.testing.assert_allclose(nbh.neighbour_overlap(a, b), [0.5, 1.0])


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    store_dir, sae_dir, codes_dir = planted_artifacts(tmp_path_factory.mktemp("study"))
    return EmbeddingStore.open(store_dir), load_sae(sae_dir), CodeStore.open(codes_dir)


def _is_measure(d):
    return set(d) >= {"value", "se", "n"} and d["n"] > 0


def test_concept_study_keys_measures_and_plots(planted, tmp_path):
    store, sae, codes = planted
    config = ConceptConfig(n_neighbours=8, probe_epochs=100, probe_lr=1e-2, umap=False, n_bootstrap=10)
    result = concept_study(store, sae, codes, config, tmp_path / "out")
    json.dumps(result, allow_nan=False)  # JSON-ready
    sharing = result["sharing"]
    for key in ("union_concepts_mean", "union_concepts_random", "union_concepts_same_label", "o1_distance"):
        assert _is_measure(sharing[key]), key
    assert sharing["union_concepts_mean"]["n"] == len(store.split["test"])
    assert sharing["union_bounds"] == {**sharing["union_bounds"], "min": codes.k, "max": 8 * codes.k}
    # Planted classes: real and same-label neighbourhoods share more concepts than random ones.
    assert sharing["union_concepts_mean"]["value"] < sharing["union_concepts_random"]["value"]
    assert sharing["union_concepts_same_label"]["value"] < sharing["union_concepts_random"]["value"]
    assert set(sharing["spaces"]) == {"embeddings", "reconstructions", "codes"}
    assert set(sharing["o1"]["wasserstein"]) == {"embeddings|reconstructions", "embeddings|codes",
                                                 "reconstructions|codes"}
    for key in ("acc_raw", "acc_recon", "acc_codes"):
        assert _is_measure(result["downstream"][key]) and result["downstream"][key]["value"] > 0.6  # chance: 0.25
    assert set(result["plots"]) == {"union_hist", "o1_cosines"}
    for path in result["plots"].values():
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_concept_study_on_an_unlabelled_store(tmp_path):
    store_dir, sae_dir, codes_dir = planted_artifacts(tmp_path, labelled=False)
    result = concept_study(EmbeddingStore.open(store_dir), load_sae(sae_dir), CodeStore.open(codes_dir),
                           ConceptConfig(n_neighbours=5, n_queries=20, spaces=("codes",), umap=False, n_bootstrap=5))
    assert result["sharing"]["union_concepts_same_label"] is None and result["sharing"]["same_label"] is None
    assert "unlabelled" in result["downstream"]["skipped"]
    assert result["sharing"]["union_concepts_mean"]["n"] == 20
    assert result["sharing"]["main_space"] == "codes"


def test_without_a_train_split_a_query_is_never_its_own_neighbour(tmp_path):
    """Queries from the test split, neighbours from every row (there is no train split): the pool holds the
    queries, so each must be left out of its own neighbourhood."""
    x = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    store = write_store(tmp_path / "store", x, split={"test": np.arange(10)})
    queries, pool, exclude_self = study_rows(store, ConceptConfig(n_neighbours=5))
    rows = find_neighbours(embedding_space(store), pool, queries, 5, exclude_self)
    assert np.array_equal(queries, np.arange(10)) and not (rows == queries[:, None]).any()


def test_concept_study_refuses_codes_of_another_store(planted, tmp_path):
    store, sae, _ = planted
    _, _, other_codes = planted_artifacts(tmp_path / "other", seed=1)
    with pytest.raises(Exception, match="encoded from another store"):
        concept_study(store, sae, CodeStore.open(other_codes), ConceptConfig(n_neighbours=5, umap=False))


def test_concept_config_validation_names_the_flag():
    with pytest.raises(ValueError, match="--n-neighbours"):
        ConceptConfig(n_neighbours=0)
    with pytest.raises(ValueError, match="--spaces"):
        ConceptConfig(spaces=("pixels",))
    with pytest.raises(ValueError, match="--n-queries"):
        ConceptConfig(n_queries=1)


@pytest.mark.slow
def test_concept_study_draws_the_umap_maps_on_a_sample(planted, tmp_path):
    store, sae, codes = planted
    config = ConceptConfig(n_neighbours=5, probe=False, umap=True, umap_max_points=100, n_bootstrap=5)
    result = concept_study(store, sae, codes, config, tmp_path)
    assert {"umap_atoms", "umap_embeddings"} <= set(result["plots"])
    assert result["umap"]["embeddings"] == f"a seeded sample of 100 of {store.n} points (seed 0)"
    assert result["umap"]["atoms"] == f"all {codes.n_latents} points"


def test_classes_too_small_for_a_same_label_neighbourhood_are_left_out_and_counted(planted, tmp_path):
    store, sae, codes = planted
    per_class = np.bincount(store.labels[store.split["train"]])
    n_nb = int(per_class.max())  # no class has more than n_neighbours training rows
    result = concept_study(store, sae, codes, ConceptConfig(n_neighbours=n_nb, umap=False, probe=False,
                                                            n_bootstrap=5, spaces=("codes",)))
    sharing = result["sharing"]
    assert sharing["union_concepts_same_label"] is None
    n_test = len(store.split["test"])
    assert sharing["same_label_note"].startswith(f"{n_test} of {n_test} queries left out")
    assert _is_measure(sharing["union_concepts_random"]) and _is_measure(sharing["union_concepts_mean"])


def test_a_neighbourhood_near_the_store_size_is_refused_before_allocating():
    with pytest.raises(ValueError, match=r"--n-neighbours 199000 for 10000 queries needs 111\.\d GiB"):
        nbh.check_lists_fit(10_000, 199_000, n_lists=5)
    nbh.check_lists_fit(10_000, 50, n_lists=5)  # the paper's setting fits easily


def test_union_sizes_in_small_steps_equal_one_step(monkeypatch):
    rng = np.random.default_rng(0)
    codes = SparseCodes(rng.random((300, 4)).astype(np.float32), rng.integers(0, 40, (300, 4)), 40)
    rows = rng.integers(0, 300, (17, 25))
    whole = nbh.union_sizes(codes, rows)
    monkeypatch.setattr(nbh, "UNION_CHUNK_ENTRIES", 250)  # two neighbourhoods a step
    assert np.array_equal(nbh.union_sizes(codes, rows), whole)
    assert np.array_equal(whole, nbh.neighbourhood_stats(codes, rows)["union"])
