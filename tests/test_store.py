"""The EmbeddingStore format and the chunk files it is assembled from."""

import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from artifacts import SCHEMA_VERSION, ArtifactError, partial_dir, write_json
from embeddings.chunks import (
    ChunkPlan,
    assemble,
    claim_partial,
    done_chunks,
    read_chunk_mask,
    write_chunk,
)
from embeddings.store import STORE_FILES, EmbeddingStore, write_store


def _store(tmp_path, name="s", dtype=np.float32, n=12, d=5, **kw):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(dtype)
    return write_store(
        tmp_path / name,
        x,
        labels=np.arange(n) % 3,
        ids=[f"img{i}.png" for i in range(n)],
        classes=["a", "b", "c"],
        split={"train": np.arange(0, 8), "test": np.arange(8, n)},
        skipped=[{"id": "bad.png", "reason": "zero bytes"}],
        config={"source": "x"},
        meta={"backbone": "b"},
        **kw,
    )


def test_store_has_every_file_dtype_memmap_and_meta(tmp_path):
    s = _store(tmp_path)
    for name in STORE_FILES + ("meta.json", "config.json"):
        assert (s.store_dir / name).is_file(), name
    assert isinstance(s.x, np.memmap) and s.x.dtype == np.float32 and s.x.shape == (12, 5)
    assert not s.x.flags.writeable
    assert s.labels.dtype == np.int64 and s.labels.tolist() == [i % 3 for i in range(12)]
    assert s.ids[3] == "img3.png" and s.classes == ["a", "b", "c"]
    assert s.split["test"].dtype == np.int64 and s.split["test"].tolist() == [8, 9, 10, 11]
    assert s.skipped == [{"id": "bad.png", "reason": "zero bytes"}]
    for key in ("schema_version", "package_version", "n", "d", "dtype", "n_skipped", "content_hash", "backbone"):
        assert key in s.meta, key
    assert (s.meta["n"], s.meta["d"], s.meta["dtype"], s.meta["n_skipped"]) == (12, 5, "float32", 1)
    assert s.meta["schema_version"] == SCHEMA_VERSION
    np.testing.assert_array_equal(s.split_x("train"), np.asarray(s.x[:8]))
    with pytest.raises(ArtifactError, match="no 'val' split"):
        s.split_x("val")


def test_float16_store(tmp_path):
    s = _store(tmp_path, dtype=np.float16)
    assert s.x.dtype == np.float16 and s.meta["dtype"] == "float16"


def test_content_hash_is_stable_and_covers_data_not_meta(tmp_path):
    a = _store(tmp_path, "a")
    b = _store(tmp_path, "b")
    assert a.content_hash == b.content_hash  # written at different times, same content
    # meta and config are not content
    write_json(b.store_dir / "config.json", {"other": 1})
    from embeddings.store import content_hash

    assert content_hash(b.store_dir) == a.content_hash
    # a changed label is
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 5)).astype(np.float32)
    c = write_store(tmp_path / "c", x, labels=np.zeros(12, dtype=np.int64))
    assert c.content_hash != a.content_hash


def test_open_refuses_missing_incomplete_and_newer(tmp_path):
    with pytest.raises(ArtifactError, match="scripts/extract.py"):
        EmbeddingStore.open(tmp_path / "nowhere")
    s = _store(tmp_path, "a")
    (s.store_dir / "split.npz").unlink()
    with pytest.raises(ArtifactError, match="split.npz is missing"):
        EmbeddingStore.open(s.store_dir)
    s = _store(tmp_path, "b")
    meta = json.loads((s.store_dir / "meta.json").read_text())
    meta["schema_version"] = SCHEMA_VERSION + 1
    write_json(s.store_dir / "meta.json", meta)
    with pytest.raises(ArtifactError, match="newer"):
        EmbeddingStore.open(s.store_dir)


def test_write_store_refuses_nan_and_existing(tmp_path):
    x = np.ones((3, 2), dtype=np.float32)
    x[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        write_store(tmp_path / "s", x)
    _store(tmp_path, "t")
    with pytest.raises(ArtifactError, match="--overwrite"):
        _store(tmp_path, "t")
    assert _store(tmp_path, "t", overwrite=True).n == 12
    assert not partial_dir(tmp_path / "t").exists()


@settings(max_examples=30, deadline=None)
@given(n_inputs=st.integers(0, 60), batch=st.integers(1, 7), mult=st.integers(1, 4), world=st.integers(1, 4))
def test_chunk_plan_covers_every_row_once_in_order(n_inputs, batch, mult, world):
    plan = ChunkPlan(n_inputs, batch * mult)
    per_rank = [plan.chunks_of_rank(r, world) for r in range(world)]
    assert sorted(c for cs in per_rank for c in cs) == list(range(plan.n_chunks))
    rows = []
    for c in range(plan.n_chunks):
        batches = plan.batches(c, batch)
        assert all(len(b) == batch for b in batches[:-1]) and all(b for b in batches)
        assert all(r // plan.chunk_size == c for b in batches for r in b)
        rows += [r for b in batches for r in b]
    assert rows == list(range(n_inputs))


def test_chunks_round_trip_and_assemble(tmp_path):
    chunks = tmp_path / "chunks"
    chunks.mkdir()
    plan = ChunkPlan(7, 3)
    rng = np.random.default_rng(1)
    full = rng.normal(size=(7, 4)).astype(np.float16)
    ok = np.array([1, 0, 1, 1, 1, 0, 0], dtype=bool)
    reasons = ["" if o else f"why {i}" for i, o in enumerate(ok)]
    for c in range(plan.n_chunks):
        r = np.array(plan.rows(c))
        write_chunk(chunks, c, full[r][ok[r]], ok[r], [reasons[i] for i in r])
    (chunks / ".chunk-000009.npz.tmp-1").write_bytes(b"half")
    assert done_chunks(chunks) == {0, 1, 2}
    mask, why = read_chunk_mask(chunks, 2)
    assert mask.tolist() == [False] and why == ["why 6"]
    ok_all, reasons_all = assemble(chunks, plan, tmp_path / "e.npy", d=4, dtype="float16")
    assert ok_all.tolist() == ok.tolist() and reasons_all == reasons
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), full[ok])
    (chunks / "chunk-000001.npz").unlink()
    with pytest.raises(ArtifactError, match=r"lacks chunks \[1\]"):
        assemble(chunks, plan, tmp_path / "e.npy", d=4, dtype="float16")


def test_claim_partial_resumes_same_and_refuses_different(tmp_path):
    work = tmp_path / ".s.partial"
    assert claim_partial(work, {"a": 1, "b": {"c": 2}}, restart=False) is False
    (work / "chunks" / "chunk-000000.npz").write_bytes(b"x")
    assert claim_partial(work, {"a": 1, "b": {"c": 2}}, restart=False) is True
    assert (work / "chunks" / "chunk-000000.npz").exists()
    with pytest.raises(ArtifactError, match=r"different settings \(b.c: 2 -> 3\).*--overwrite"):
        claim_partial(work, {"a": 1, "b": {"c": 3}}, restart=False)
    assert claim_partial(work, {"a": 1, "b": {"c": 3}}, restart=True) is False
    assert not (work / "chunks" / "chunk-000000.npz").exists()


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    from artifacts import atomic_file

    path = tmp_path / "a.bin"
    with atomic_file(path) as f:
        f.write(b"first")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as f:
            f.write(b"half of the sec")
            raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]  # the temporary went with the exception
    with atomic_file(path, "w") as f:
        f.write("second")
    assert path.read_text() == "second"


def test_begin_dir_refuses_before_any_work_and_clears_leftovers(tmp_path):
    from artifacts import begin_dir

    final = tmp_path / "artifact"
    work = begin_dir(final)
    (work / "half.npy").write_bytes(b"left by a crash")
    work = begin_dir(final)
    assert work == partial_dir(final) and list(work.iterdir()) == []
    final.mkdir()
    shutil.rmtree(work)
    with pytest.raises(ArtifactError, match="--overwrite"):
        begin_dir(final)
    assert not work.exists()  # refused before anything was written
    assert begin_dir(final, overwrite=True).is_dir()
