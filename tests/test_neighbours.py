"""NeighbourIndex: exact search equals brute force in dense and code space; exclusion; split restriction."""

import numpy as np
import pytest

from analysis.neighbours import NeighbourIndex, SparseCodes


def _brute_cosine(q, x):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    return qn @ xn.T


def test_dense_cosine_equals_brute_force_with_split_and_exclusion():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 12)).astype(np.float32)
    train = np.arange(0, 400, 2)
    scores, rows = NeighbourIndex().fit(x, rows=train).search(x[:20], 7, exclude=np.arange(20))
    sims = _brute_cosine(x[:20], x[train])
    sims[np.arange(20) % 2 == 0, np.arange(20)[np.arange(20) % 2 == 0] // 2] = -np.inf
    np.testing.assert_allclose(scores, -np.sort(-sims, axis=1)[:, :7], atol=1e-5)
    assert np.isin(rows, train).all()
    assert not (rows == np.arange(20)[:, None]).any()


def test_code_space_equals_brute_force_on_dense_codes():
    rng = np.random.default_rng(1)
    n, n_latents, k = 300, 48, 4
    indices = np.stack([rng.choice(n_latents, k, replace=False) for _ in range(n)])
    values = -np.sort(-rng.random((n, k)).astype(np.float32), axis=1)
    codes = SparseCodes(values, indices, n_latents)
    scores, rows = NeighbourIndex().fit(codes).search(codes.take(np.arange(30)), 10, exclude=np.arange(30))
    sims = _brute_cosine(codes.dense()[:30], codes.dense())
    sims[np.arange(30), np.arange(30)] = -np.inf
    np.testing.assert_allclose(scores, -np.sort(-sims, axis=1)[:, :10], atol=1e-5)
    # Ties tolerated: every returned row has the brute-force score it claims.
    np.testing.assert_allclose(np.take_along_axis(sims, rows, 1), scores, atol=1e-5)


def test_search_refuses_to_run_unfitted():
    with pytest.raises(RuntimeError, match="not fitted"):
        NeighbourIndex().search(np.zeros((1, 3), np.float32), 1)


# -- brute force in every metric, exclusion, batching ----------------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import faiss  # noqa: E402

from analysis import code_index  # noqa: E402
from analysis.neighbours import recall_at_n  # noqa: E402
from synthetic_concepts import random_codes  # noqa: E402


def test_dense_l2_equals_brute_force():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    scores, rows = NeighbourIndex(metric="l2").fit(x).search(x[:25], 6, exclude=np.arange(25))
    d2 = ((x[:25, None, :] - x[None]) ** 2).sum(-1)
    d2[np.arange(25), np.arange(25)] = np.inf
    np.testing.assert_allclose(scores, np.sort(d2, axis=1)[:, :6], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.take_along_axis(d2, rows, 1), scores, rtol=1e-4, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(st.integers(12, 120), st.integers(4, 40), st.integers(1, 4), st.integers(1, 10), st.integers(0, 10_000))
def test_code_space_equals_brute_force_property(n, n_latents, k, n_neighbours, seed):
    rng = np.random.default_rng(seed)
    k = min(k, n_latents)
    codes = random_codes(rng, n, n_latents, k)
    n_neighbours = min(n_neighbours, n - 1)
    queries = np.arange(min(n, 9))
    scores, rows = NeighbourIndex(batch_size=4).fit(codes).search(codes.take(queries), n_neighbours, exclude=queries)
    sims = _brute_cosine(codes.dense()[queries], codes.dense())
    sims[np.arange(queries.size), queries] = -np.inf
    np.testing.assert_allclose(scores, -np.sort(-sims, axis=1)[:, :n_neighbours], atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(sims, rows, 1), scores, atol=1e-5)
    assert not (rows == queries[:, None]).any()  # exclude_self never returns the query
    assert all(len(set(r)) == n_neighbours for r in rows.tolist())


@settings(max_examples=20, deadline=None)
@given(st.integers(5, 80), st.integers(1, 6), st.integers(0, 10_000), st.sampled_from(["cosine", "l2"]))
def test_exclude_self_never_returns_the_query(n, n_neighbours, seed, metric):
    rng = np.random.default_rng(seed)
    # Duplicated points: the query's twin ties with the query itself, which must still never come back.
    x = np.repeat(rng.normal(size=(n, 3)).astype(np.float32), 2, axis=0)
    n_neighbours = min(n_neighbours, 2 * n - 1)
    queries = rng.choice(2 * n, min(10, 2 * n), replace=False)
    _, rows = NeighbourIndex(metric=metric).fit(x).search(x[queries], n_neighbours, exclude=queries)
    assert not (rows == queries[:, None]).any()


@settings(max_examples=30, deadline=None)
@given(st.integers(5, 150), st.integers(2, 300), st.integers(1, 6), st.integers(1, 12), st.integers(0, 10_000))
def test_compiled_code_search_equals_its_reference_twin(n, n_latents, k, n_neighbours, seed):
    rng = np.random.default_rng(seed)
    k, n_neighbours = min(k, n_latents), min(n_neighbours, n - 1)
    codes = random_codes(rng, n, n_latents, k, p_zero=0.3)  # explicit zeros in the lists
    queries = rng.choice(n, min(n, 17), replace=False)
    fast = NeighbourIndex().fit(codes).search(codes.take(queries), n_neighbours, exclude=queries)
    plain = NeighbourIndex(fast=False).fit(codes).search(codes.take(queries), n_neighbours, exclude=queries)
    np.testing.assert_allclose(fast[0], plain[0], atol=1e-6)
    np.testing.assert_array_equal(fast[1], plain[1])  # same float32 sums here, so the same ties


def test_sparse_batches_cut_by_candidate_count_give_the_same_answer(monkeypatch):
    rng = np.random.default_rng(3)
    codes = random_codes(rng, 200, 16, 3)
    index = NeighbourIndex().fit(codes)
    expected = index.search(codes.take(np.arange(50)), 5)
    monkeypatch.setattr(code_index, "SPARSE_BATCH_ENTRIES", 40)
    got = index.search(codes.take(np.arange(50)), 5)
    np.testing.assert_allclose(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


# -- approximate FAISS indexes, recall, persistence ---------------------------------------------------------
def _clustered(seed=4, n=2000, d=16, n_clusters=20):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, d))
    return (centres[rng.integers(0, n_clusters, n)] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)


def test_ivf_with_every_list_probed_is_exact_and_fewer_probes_lose_recall():
    x = _clustered()
    exact = NeighbourIndex().fit(x).search(x[:200], 20, exclude=np.arange(200))[1]
    full = NeighbourIndex(factory="IVF16,Flat", nprobe=16).fit(x).search(x[:200], 20, exclude=np.arange(200))[1]
    assert recall_at_n(full, exact)["value"] == 1.0
    one = NeighbourIndex(factory="IVF16,Flat", nprobe=1).fit(x).search(x[:200], 20, exclude=np.arange(200))[1]
    r = recall_at_n(one, exact)
    assert 0.0 < r["value"] < 1.0 and r["n"] == 200 and r["se"] > 0


def test_hnsw_recall_against_exact():
    x = _clustered(seed=5)
    exact = NeighbourIndex().fit(x).search(x[:100], 10)[1]
    approx = NeighbourIndex(factory="HNSW16", ef_search=128).fit(x).search(x[:100], 10)[1]
    assert recall_at_n(approx, exact)["value"] > 0.9
    assert faiss.downcast_index(NeighbourIndex(factory="HNSW16", ef_search=77).fit(x).index_).hnsw.efSearch == 77


def test_recall_at_n_counts_the_exact_rows_found():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, 10], [8, 7, 6, 5]])
    r = recall_at_n(found, exact)
    assert r["value"] == pytest.approx(0.75) and r["n"] == 2


def test_bad_factory_and_knobs_are_refused():
    x = _clustered(n=200)
    with pytest.raises(ValueError, match="--factory"):
        NeighbourIndex(factory="NotAnIndex").fit(x)
    with pytest.raises(ValueError, match="--nprobe"):
        NeighbourIndex(factory="Flat", nprobe=4).fit(x)
    with pytest.raises(ValueError, match="--nprobe"):
        NeighbourIndex(nprobe=0)
    with pytest.raises(ValueError, match="--device"):
        NeighbourIndex(device="tpu")
    with pytest.raises(ValueError, match="cannot be trained on 200 rows"):
        NeighbourIndex(factory="IVF8,PQ4").fit(x)  # 8-bit PQ needs 256 training rows


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat", "HNSW8", "IVF8,PQ4x4"])
def test_save_load_identity_dense(tmp_path, factory, mmap):
    x = _clustered(n=600)
    train = np.arange(0, 600, 3)
    index = NeighbourIndex(factory=factory, nprobe=None if "IVF" not in factory else 3).fit(x, rows=train)
    index.save(tmp_path / "index", parents={"store_hash": "abc"})
    loaded = NeighbourIndex.load(tmp_path / "index", mmap=mmap)
    for a, b in zip(index.search(x[:40], 7), loaded.search(x[:40], 7)):
        np.testing.assert_array_equal(a, b)
    assert (loaded.factory, loaded.nprobe, loaded.n_) == (index.factory, index.nprobe, index.n_)


@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_identity_code_space(tmp_path, mmap):
    codes = random_codes(np.random.default_rng(6), 150, 20, 3)
    index = NeighbourIndex().fit(codes, rows=np.arange(0, 150, 2))
    index.save(tmp_path / "codes-index")
    loaded = NeighbourIndex.load(tmp_path / "codes-index", mmap=mmap)
    for a, b in zip(index.search(codes.take(np.arange(30)), 5), loaded.search(codes.take(np.arange(30)), 5)):
        np.testing.assert_array_equal(a, b)


def test_load_refuses_an_index_of_other_parents(tmp_path):
    from artifacts import ArtifactError

    NeighbourIndex().fit(_clustered(n=100)).save(tmp_path / "index", parents={"store_hash": "abc"})
    assert NeighbourIndex.load(tmp_path / "index", parents={"store_hash": "abc"}).n_ == 100
    with pytest.raises(ArtifactError, match=r"built from other data \(store_hash differ\).*delete"):
        NeighbourIndex.load(tmp_path / "index", parents={"store_hash": "xyz"})


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat", "HNSW8"])
def test_vectors_read_back_the_indexed_rows(tmp_path, factory):
    x = _clustered(n=500)
    rows = np.arange(0, 500, 2)
    index = NeighbourIndex(factory=factory).fit(x, rows=rows)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(index.vectors([0, 8, 498]), unit[[0, 8, 498]], atol=1e-6)
    index.save(tmp_path / "index")
    np.testing.assert_allclose(NeighbourIndex.load(tmp_path / "index", mmap=True).vectors([8]), unit[[8]], atol=1e-6)
    with pytest.raises(ValueError, match="rows that the index holds"):
        index.vectors([1])


def test_backends_behind_the_one_interface():
    from analysis.code_index import CodeIndex
    from analysis.dense_index import DenseIndex

    assert isinstance(NeighbourIndex().fit(_clustered(n=50)).backend_, DenseIndex)
    assert isinstance(NeighbourIndex().fit(random_codes(np.random.default_rng(0), 30, 8, 2)).backend_, CodeIndex)
    with pytest.raises(ValueError, match="no search parameters"):
        NeighbourIndex().fit(random_codes(np.random.default_rng(0), 30, 8, 2)).set_search_parameters(nprobe=2)


@settings(max_examples=20, deadline=None)
@given(st.integers(3, 90), st.integers(1, 6), st.sampled_from(["cosine", "l2"]), st.integers(0, 10_000))
def test_exact_search_equals_a_full_sort(n, want, metric, seed):
    from analysis import dense_index

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    want = min(want, n - 1)
    queries = np.arange(min(n, 7))
    old_block = dense_index.EXACT_BLOCK
    dense_index.EXACT_BLOCK = 4  # several blocks, so that the merge is exercised
    try:
        scores, rows = dense_index.exact_search(x, x[queries], want, metric, exclude=queries)
    finally:
        dense_index.EXACT_BLOCK = old_block
    if metric == "cosine":
        full = _brute_cosine(x[queries], x)
    else:
        full = -((x[queries][:, None] - x[None]) ** 2).sum(-1)
    full[np.arange(queries.size), queries] = -np.inf
    expected = -np.sort(-full, axis=1)[:, :want]
    np.testing.assert_allclose(scores, expected if metric == "cosine" else -expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.take_along_axis(full, rows, 1), expected, rtol=1e-4, atol=1e-4)


def test_save_refuses_an_existing_directory_and_load_refuses_other_artifacts(tmp_path):
    from artifacts import ArtifactError, write_json

    index = NeighbourIndex().fit(_clustered(n=100))
    index.save(tmp_path / "index")
    with pytest.raises(Exception, match="exists|overwrite"):
        index.save(tmp_path / "index")
    (tmp_path / "other").mkdir()
    write_json(tmp_path / "other" / "meta.json", {"kind": "codes"})
    with pytest.raises(ArtifactError, match="not a saved neighbour index"):
        NeighbourIndex.load(tmp_path / "other")


@pytest.mark.skipif(hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0, reason="a GPU FAISS is here")
def test_gpu_index_without_gpu_faiss_says_so():
    with pytest.raises(ValueError, match="FAISS GPU build"):
        NeighbourIndex(device="cuda").fit(_clustered(n=100))


@pytest.mark.gpu
def test_gpu_index_equals_cpu_index():
    if not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
        pytest.skip("this FAISS build has no GPU support")
    x = _clustered(n=1000)
    cpu = NeighbourIndex().fit(x).search(x[:50], 10)
    gpu = NeighbourIndex(device="cuda").fit(x).search(x[:50], 10)
    np.testing.assert_allclose(gpu[0], cpu[0], atol=1e-4)
    assert recall_at_n(gpu[1], cpu[1])["value"] > 0.99


def test_nan_features_are_refused_naming_the_file_and_the_row(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    x[13, 2] = np.nan
    np.save(tmp_path / "embeddings.npy", x)
    mapped = np.load(tmp_path / "embeddings.npy", mmap_mode="r")
    with pytest.raises(ValueError, match=r"embeddings\.npy hold NaN or Inf in 1 of 20 rows, the first row 13"):
        NeighbourIndex().fit(mapped)
    with pytest.raises(ValueError, match=r"the first row 13"):
        NeighbourIndex().fit(mapped, rows=np.arange(5, 20))


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_a_flat_index_scanned_by_blocks_answers_as_faiss_and_the_plain_twin(metric, monkeypatch):
    """Many queries on a Flat index go through ``scan_search`` (torch's matrix product by blocks); it finds the
    rows FAISS's own scan and ``exact_search`` find, with the same scores, nearest first."""
    from analysis import dense_index

    rng = np.random.default_rng(5)
    x = rng.normal(size=(3000, 16)).astype(np.float32)
    q = rng.normal(size=(dense_index.SCAN_MIN_QUERIES, 16)).astype(np.float32)
    monkeypatch.setattr(dense_index, "SCAN_BLOCK", 700)      # several blocks and a short last one: the merge
    index = dense_index.DenseIndex(metric, "Flat").fit(x, None)
    assert dense_index.flat_rows(index.index_) is not None
    calls, scan = [], dense_index.scan_search
    monkeypatch.setattr(dense_index, "scan_search", lambda *a: calls.append(1) or scan(*a))
    scores, rows = index.search(q, 9)
    assert calls, "a Flat index asked this many queries is scanned by blocks"
    f_scores, f_rows = index.index_.search(dense_index.prepare(q, metric), 9)
    t_scores, t_rows = dense_index.exact_search(x, q, 9, metric)
    for other_scores, other_rows in ((f_scores, f_rows), (t_scores, t_rows)):
        assert np.array_equal(rows, other_rows)
        np.testing.assert_allclose(scores, other_scores, rtol=1e-5, atol=1e-4)
    assert np.all(np.diff(scores, axis=1) <= 0 if metric == "cosine" else np.diff(scores, axis=1) >= 0)
    few, few_rows = index.search(q[:5], 9)                       # a few queries: FAISS's own scan
    assert len(calls) == 1 and np.array_equal(few_rows, rows[:5])
