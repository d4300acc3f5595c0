"""The EmbeddingStore format and the chunk files it is assembled from."""

import errno
import io
import json
import os
import shutil
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from artifacts import SCHEMA_VERSION, ArtifactError, DiskFullError, partial_dir, write_json
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


# ------------------------------------------------------------------------------------------- damaged and crafted files


def _rewrite_split(store, **arrays):
    with open(store.store_dir / "split.npz", "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("edit, match", [
    (lambda s: write_json(s.store_dir / "ids.json", {str(i): i for i in range(12)}),
     r"ids\.json holds a JSON object where a JSON list belongs.*scripts/extract\.py"),
    (lambda s: write_json(s.store_dir / "ids.json", [f"img{i}" for i in range(11)] + [None]),
     r"ids\.json entry 11 is None, not a string"),
    (lambda s: write_json(s.store_dir / "meta.json", [1, 2, 3]),
     r"meta\.json holds a JSON list where a JSON object belongs"),
    (lambda s: write_json(s.store_dir / "classes.json", "abc"),
     r"classes\.json holds a JSON string where a JSON list belongs"),
    (lambda s: write_json(s.store_dir / "config.json", 7), r"config\.json holds a JSON number where a JSON object"),
    (lambda s: write_json(s.store_dir / "skipped.json", {"a": 1}), r"skipped\.json holds a JSON object"),
    (lambda s: np.save(s.store_dir / "labels.npy", np.arange(12) % 3 + 0.5),
     r"labels\.npy holds float64 where integers or unsigned integers belong"),
    (lambda s: np.save(s.store_dir / "labels.npy", np.full(12, 10**9)),
     r"labels\.npy holds label 1000000000 at row 0, but .*classes\.json names 3 classes: a label is -1 \(unknown\) "
     r"or 0\.\.2"),
    (lambda s: np.save(s.store_dir / "labels.npy", np.full(12, -5)), r"labels\.npy holds label -5 at row 0"),
    (lambda s: np.save(s.store_dir / "embeddings.npy", np.zeros((12, 5), np.int64)),
     r"embeddings\.npy holds int64 where floats belong"),
    (lambda s: _rewrite_split(s, train=np.array([0, 1, 12])),
     r"split\.npz: the train split holds row 12, outside the store's rows 0\.\.11"),
    (lambda s: _rewrite_split(s, test=np.array([-1, 3])), r"split\.npz: the test split holds row -1"),
    (lambda s: _rewrite_split(s, train=np.array([0.0, 1.0])),
     r"split\.npz: train holds float64 \(2,\) where a 1-d array of integer row indices belongs"),
    (lambda s: _rewrite_split(s, holdout=np.array([0])), r"split\.npz holds a member 'holdout\.npy'"),
    (lambda s: (s.store_dir / "split.npz").write_bytes(b"PK\x03\x04 not a zip"), r"split\.npz is truncated or corrupt"),
    (lambda s: (s.store_dir / "meta.json").write_bytes(b"\xff\xfe\x00{"), r"meta\.json is not valid JSON"),
])
def test_damaged_or_crafted_files_are_refused_naming_the_file(tmp_path, edit, match):
    s = _store(tmp_path)
    edit(s)
    with pytest.raises(ArtifactError, match=match):
        EmbeddingStore.open(s.store_dir)


def test_a_split_member_claiming_a_huge_array_allocates_nothing(tmp_path):
    s = _store(tmp_path)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<i8", "fortran_order": False, "shape": (10**12,)})
    member = header.getvalue() + np.arange(4, dtype=np.int64).tobytes()
    with zipfile.ZipFile(s.store_dir / "split.npz", "w") as z:
        z.writestr("train.npy", member)
    with pytest.raises(ArtifactError, match=r"split\.npz: train: its header \(int64 \(1000000000000,\)\) needs"):
        EmbeddingStore.open(s.store_dir)


def test_labels_without_classes_get_numbered_classes_and_the_writer_refuses_labels_beyond_them(tmp_path):
    x = np.zeros((4, 2), np.float32)
    s = write_store(tmp_path / "a", x, labels=np.array([0, 2, -1, 1]))
    assert s.classes == ["0", "1", "2"]
    with pytest.raises(ValueError, match=r"0\.\.1 of the 2 classes; got -1\.\.5"):
        write_store(tmp_path / "b", x, labels=np.array([0, 5, -1, 1]), classes=["a", "b"])
    assert not (tmp_path / "b").exists()


def test_verify_names_the_rows_that_hold_nan(tmp_path):
    s = _store(tmp_path)
    emb = np.load(s.store_dir / "embeddings.npy", mmap_mode="r+")
    emb[[3, 7], 1] = np.nan
    emb.flush()
    del emb
    meta = json.loads((s.store_dir / "meta.json").read_text())
    from embeddings.store import content_hash, file_hashes

    meta["file_sha256"] = file_hashes(s.store_dir)  # hashes re-recorded: only the values betray it
    meta["content_hash"] = content_hash(s.store_dir)
    write_json(s.store_dir / "meta.json", meta)
    store = EmbeddingStore.open(s.store_dir)
    with pytest.raises(ArtifactError, match=rf"{s.store_dir / 'embeddings.npy'} holds NaN or Inf in rows \[3, 7\]"):
        store.verify()
    store.check_finite(rows=[0, 1, 2])  # rows without NaN pass


# ------------------------------------------------------------------------------------------- a full disk


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_assembling_is_an_error_naming_the_file(tmp_path, monkeypatch):
    chunks = tmp_path / "chunks"
    chunks.mkdir()
    plan = ChunkPlan(4, 2)
    for c in range(2):
        write_chunk(chunks, c, np.ones((2, 3), np.float32), np.ones(2, bool), ["", ""])
    monkeypatch.setattr(os, "posix_fallocate", _full_disk)
    with pytest.raises(DiskFullError, match=rf"No space left on device while writing {tmp_path / 'e.npy'} "
                                            rf"\(it needs 1\d\d bytes\) \(extraction: assembling") as info:
        assemble(chunks, plan, tmp_path / "e.npy", d=3, dtype="float32")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "e.npy")
    assert not (tmp_path / "e.npy").exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_write_that_fills_the_disk_is_an_error_naming_the_file(tmp_path):
    """``/dev/full`` answers every write with ENOSPC (and cannot reserve space, so the write itself must report)."""
    chunks = tmp_path / "chunks"
    chunks.mkdir()
    write_chunk(chunks, 0, np.ones((2, 3), np.float32), np.ones(2, bool), ["", ""])
    full = tmp_path / "e.npy"
    full.symlink_to("/dev/full")
    with pytest.raises(DiskFullError, match=rf"while writing {full} "):
        assemble(chunks, ChunkPlan(2, 2), full, d=3, dtype="float32")
    assert os.path.exists("/dev/full") and not os.path.lexists(full)


def test_a_full_disk_ends_an_extraction_cleanly_and_a_rerun_resumes(tmp_path, monkeypatch, one_thread):
    from artifacts import lock_path
    from embeddings.extract import ExtractConfig, ExtractRun, extract

    root = tmp_path / "images"
    for i in range(4):
        root.mkdir(exist_ok=True)
        Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(root / f"{i}.png")
    config = ExtractConfig(source=str(root), backbone="digits-cnn", weights="random", batch_size=2)
    run = ExtractRun(out_dir=tmp_path / "store", device="cpu", num_workers=0, n_threads=1, chunk_size=2,
                     progress=False)
    real = os.posix_fallocate
    monkeypatch.setattr(os, "posix_fallocate", _full_disk)
    with pytest.raises(DiskFullError, match=r"store\.partial/store/embeddings\.npy .*\(extraction: assembling"):
        extract(config, run)
    assert not (tmp_path / "store").exists() and not lock_path(tmp_path / "store").exists()
    assert not (partial_dir(tmp_path / "store") / "store" / "embeddings.npy").exists()
    assert done_chunks(partial_dir(tmp_path / "store") / "chunks") == {0, 1}  # the computed work is kept
    monkeypatch.setattr(os, "posix_fallocate", real)
    assert extract(config, run).n == 4
