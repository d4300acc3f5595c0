"""The saved query index of a space: chosen by size with its recall against exact recorded, saved under a key of
what it indexes, reused by a later process, never reused for other data, refused when its record is stale."""

import json

import numpy as np
import pytest

from analysis.neighbours import NeighbourIndex, SparseCodes, recall_at_n
from analysis.space_index import (
    IndexSettings, build_space_index, choose_factory, index_key, n_lists, open_space_index,
)
from artifacts import ArtifactError, write_json
from synthetic_concepts import random_codes


def _clustered(n=3000, d=16, n_clusters=30, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, d))
    return (centres[rng.integers(0, n_clusters, n)] + 0.4 * rng.normal(size=(n, d))).astype(np.float32)


def test_the_index_is_chosen_by_size():
    small = IndexSettings()
    assert choose_factory(1797, 64, small) == "Flat"
    assert choose_factory(100_000, 512, small) == f"IVF{n_lists(100_000)},Flat" == "IVF316,Flat"
    assert choose_factory(100_000, 512, IndexSettings(exact=True)) == "Flat"  # --exact
    assert choose_factory(500, 512, IndexSettings(exact_max_entries=0)) == "Flat"  # too few rows to train IVF


def test_an_exact_index_records_recall_one_and_the_nearest_similarities():
    x = _clustered(n=400)
    built = build_space_index(x, IndexSettings(n_sample=50))
    q = built.quality
    assert built.index.factory == "Flat" and q["exact"] and q["nprobe"] is None
    assert {n: r["value"] for n, r in q["recall"].items()} == {"10": 1.0, "50": 1.0}
    # The nearest-similarity sample is each sampled row's exact nearest other row.
    sample = np.sort(np.random.default_rng(0).choice(400, 50, replace=False))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = xn[sample] @ xn.T
    sims[np.arange(50), sample] = -np.inf
    np.testing.assert_allclose(q["nearest_similarity"]["sorted_sample"], np.sort(sims.max(1)), atol=1e-5)


def test_above_the_threshold_an_ivf_is_built_and_its_recall_against_exact_is_recorded():
    x = _clustered()
    settings = IndexSettings(exact_max_entries=0, n_sample=120, recall_target=0.95)
    built = build_space_index(x, settings)
    q = built.quality
    assert q["factory"] == built.index.factory == f"IVF{n_lists(3000)},Flat" and not q["exact"]
    assert q["nprobe"] == built.index.nprobe and q["recall_curve"][-1]["nprobe"] == q["nprobe"]
    assert all(r["value"] >= 0.95 for r in q["recall"].values())
    # The recorded recall is what an independent exact search of the same sample finds.
    sample = np.sort(np.random.default_rng(0).choice(3000, 120, replace=False))
    exact = NeighbourIndex().fit(x).search(x[sample], 50, exclude=sample)[1]
    found = built.index.search(x[sample], 50, exclude=sample)[1]
    for n in (10, 50):
        assert q["recall"][str(n)]["value"] == pytest.approx(recall_at_n(found[:, :n], exact[:, :n])["value"])
    # Fewer probes than chosen miss the target: the smallest sufficient nprobe was chosen.
    earlier = [c for c in q["recall_curve"] if c["nprobe"] < q["nprobe"] and c["recall"] is not None]
    assert all(min(c["recall"].values()) < 0.95 for c in earlier)


def test_code_space_is_always_exact():
    codes = random_codes(np.random.default_rng(1), 300, 40, 4)
    q = build_space_index(codes, IndexSettings(exact_max_entries=0, n_sample=40)).quality
    assert q["exact"] and q["factory"] == "inverted lists"


def test_saved_once_reused_by_a_later_open_and_never_for_other_data(tmp_path):
    x = _clustered(n=2500)
    settings = IndexSettings(exact_max_entries=0, n_sample=80)
    calls = []

    def data():
        calls.append(1)
        return x

    first = open_space_index(tmp_path, "embeddings", {"store_hash": "a"}, data, settings)
    assert first.path == tmp_path / index_key("embeddings", {"store_hash": "a"}, settings) and not first.reused
    assert json.loads((first.path / "quality.json").read_text())["nprobe"] == first.quality["nprobe"]
    again = open_space_index(tmp_path, "embeddings", {"store_hash": "a"}, data, settings)
    assert again.reused and len(calls) == 1 and again.quality == first.quality
    for a, b in zip(first.search(x[:20], 5, exclude=np.arange(20)), again.search(x[:20], 5, exclude=np.arange(20))):
        np.testing.assert_array_equal(a, b)
    # Other data (another store hash) or other settings: another directory, built anew.
    other = open_space_index(tmp_path, "embeddings", {"store_hash": "b"}, data, settings)
    exact = open_space_index(tmp_path, "embeddings", {"store_hash": "a"}, data, IndexSettings(exact=True))
    assert len(calls) == 3 and not other.reused and other.path != first.path
    assert exact.index.factory == "Flat" and exact.path != first.path


def test_a_stale_or_damaged_saved_index_is_refused_naming_it(tmp_path):
    x = _clustered(n=300)
    parents = {"store_hash": "a"}
    built = open_space_index(tmp_path, "embeddings", parents, lambda: x, IndexSettings(n_sample=30))
    meta = json.loads((built.path / "meta.json").read_text())
    write_json(built.path / "meta.json", {**meta, "parents": {"store_hash": "edited"}})
    with pytest.raises(ArtifactError, match=f"{built.path}.*stale.*delete"):
        open_space_index(tmp_path, "embeddings", parents, lambda: x, IndexSettings(n_sample=30))
    write_json(built.path / "meta.json", meta)
    (built.path / "index.faiss").write_bytes(b"not an index")
    with pytest.raises(ArtifactError, match="cannot be read.*delete"):
        open_space_index(tmp_path, "embeddings", parents, lambda: x, IndexSettings(n_sample=30))


def test_an_unwritable_index_directory_builds_in_memory_and_says_so(tmp_path):
    (tmp_path / "a-file").write_text("")
    built = open_space_index(tmp_path / "a-file", "embeddings", {"store_hash": "a"}, lambda: _clustered(n=200),
                             IndexSettings(n_sample=20))
    assert built.path is None and "could not save the index" in built.note
    assert open_space_index(None, "codes", {}, lambda: random_codes(np.random.default_rng(0), 50, 10, 2),
                            IndexSettings(n_sample=20)).note.startswith("built in memory")


def test_nearest_percentile_places_a_query_against_the_store():
    x = _clustered(n=500)
    built = build_space_index(x, IndexSettings(n_sample=200))
    sample = np.asarray(built.quality["nearest_similarity"]["sorted_sample"])
    assert built.nearest_percentile(sample.min() - 0.01) == 0.0
    assert built.nearest_percentile(1.0) == 100.0
    assert built.nearest_percentile(float(np.median(sample))) == pytest.approx(50.0, abs=1.0)


def test_an_ivf_query_whose_lists_are_too_short_is_searched_with_every_list():
    x = _clustered(n=2000, n_clusters=4)
    built = build_space_index(x, IndexSettings(exact_max_entries=0, n_sample=40))
    built.index.set_search_parameters(nprobe=1)
    built.quality["nprobe"] = 1
    want = 1500  # more than one list holds
    scores, rows = built.search(x[:2], want)
    assert rows.shape == (2, want) and (rows >= 0).all() and built.index.nprobe == 1


def test_sparse_codes_go_to_the_code_index():
    codes = random_codes(np.random.default_rng(2), 100, 12, 3)
    built = build_space_index(SparseCodes(codes.values, codes.indices, 12), IndexSettings(n_sample=10))
    assert built.index.sparse_
