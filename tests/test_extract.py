"""Extraction end to end: digits and image folders, bad inputs, NaN, overwrite and resume refusals."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import embeddings.extract as extract_mod
import embeddings.loader as loader_mod
from artifacts import ArtifactError, partial_dir
from embeddings.extract import ExtractConfig, ExtractError, ExtractRun, extract
from embeddings.sources import open_source
from embeddings.store import STORE_FILES

DIGITS = dict(source="digits", backbone="digits-cnn", weights="random", batch_size=64)


def _run(out_dir, **kw):
    kw = {"num_workers": 0, "n_threads": 1, "chunk_size": 512, "progress": False, **kw}
    return ExtractRun(out_dir=out_dir, **kw)


def store_bytes(store_dir):
    return {name: (store_dir / name).read_bytes() for name in STORE_FILES}


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "store"
    return extract(ExtractConfig(**DIGITS), _run(out))


def test_digits_store_contents(digits_store):
    s = digits_store
    src = open_source("digits")
    assert s.n == len(src) == 1797 and s.x.dtype == np.float32 and s.d == s.meta["backbone_info"]["d"]
    assert s.ids == src.ids and s.classes == src.classes
    np.testing.assert_array_equal(s.labels, src.labels)
    assert set(s.split) == {"train", "val", "test"}
    for name, rows in src.split.items():
        np.testing.assert_array_equal(s.split[name], rows)  # nothing skipped: store rows are input rows
    assert s.skipped == [] and s.meta["n_skipped"] == 0
    assert np.isfinite(np.asarray(s.x)).all() and np.asarray(s.x).std() > 0
    for key in ("backbone", "weights_source", "weights_sha256", "preprocessing", "output_kind", "normalize",
                "fingerprint", "timings", "images_per_s", "content_hash", "schema_version"):
        assert key in s.meta, key
    assert s.meta["backbone"] == "digits-cnn" and s.config["dtype"] == "float32" and s.config["run"]["chunk_size"] == 512
    assert not partial_dir(s.store_dir).exists()


def test_digits_embeddings_equal_a_plain_forward(digits_store):
    """The pipeline (workers, chunks, channels-last) changes nothing: rows equal the backbone's own output."""
    from embeddings.backbone import load_backbone
    import torch

    torch.manual_seed(0)  # extraction builds random weights from a generator seeded with config.seed
    bb = load_backbone("digits-cnn", weights="random")
    src = open_source("digits")
    rows = [0, 1, 700, 1796]
    with torch.inference_mode():
        ref = bb.features(torch.stack([bb.transform(src.load(r)) for r in rows])).float().numpy()
    np.testing.assert_allclose(np.asarray(digits_store.x[rows]), ref, rtol=1e-5, atol=1e-5)


def test_identical_store_is_returned_untouched(digits_store, tmp_path):
    before = (digits_store.store_dir / "embeddings.npy").stat().st_mtime_ns
    again = extract(ExtractConfig(**DIGITS), _run(digits_store.store_dir, chunk_size=512))
    assert again.meta["timings"] == digits_store.meta["timings"]
    assert (digits_store.store_dir / "embeddings.npy").stat().st_mtime_ns == before


def test_an_image_replaced_under_its_name_is_never_answered_with_the_old_store(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (12, 12), (60 * i, 0, 0)).save(root / f"{i}.png")
    config = ExtractConfig(source=str(root), backbone="digits-cnn", weights="random", batch_size=3)
    first = extract(config, _run(tmp_path / "store", chunk_size=3))
    old_row = np.asarray(first.x[1]).copy()
    Image.new("RGB", (12, 12), (255, 255, 255)).save(root / "1.png")  # same name, other pixels
    with pytest.raises(ArtifactError, match="already holds a different store; pass --overwrite"):
        extract(config, _run(tmp_path / "store", chunk_size=3))
    second = extract(config, _run(tmp_path / "store", chunk_size=3, overwrite=True))
    assert not np.allclose(np.asarray(second.x[1]), old_row)
    assert second.meta["fingerprint"] != first.meta["fingerprint"]


def test_float16_and_overwrite_protection(digits_store, tmp_path):
    out = tmp_path / "store"
    # A float32 copy of the digits store at `out`, then a float16 request for the same directory.
    import shutil

    shutil.copytree(digits_store.store_dir, out)
    cfg16 = ExtractConfig(**{**DIGITS, "dtype": "float16"})
    with pytest.raises(ArtifactError, match="--overwrite"):
        extract(cfg16, _run(out))
    assert store_bytes(out) == store_bytes(digits_store.store_dir)  # untouched
    s16 = extract(cfg16, _run(out, overwrite=True))
    assert s16.x.dtype == np.float16 and s16.meta["dtype"] == "float16"
    np.testing.assert_allclose(np.asarray(s16.x, dtype=np.float32), np.asarray(digits_store.x), rtol=1e-2, atol=1e-2)
    # a directory of other files is not overwritten either, and --overwrite is not offered for it
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not an artifact of this toolkit.*choose another --out") as refused:
        extract(cfg16, _run(other))
    assert "--overwrite" not in str(refused.value)
    assert (other / "notes.txt").read_text() == "mine"


def test_chunk_size_must_be_a_multiple_of_batch_size(tmp_path):
    with pytest.raises(ValueError, match="--chunk-size.*--batch-size"):
        extract(ExtractConfig(**DIGITS), _run(tmp_path / "s", chunk_size=100))


def test_config_validation_names_flags():
    with pytest.raises(ValueError, match="--dtype"):
        ExtractConfig(source="digits", dtype="int8")
    with pytest.raises(ValueError, match="--batch-size"):
        ExtractConfig(source="digits", batch_size=0)
    with pytest.raises(ValueError, match="--num-workers"):
        ExtractRun(out_dir="x", num_workers=-1)
    with pytest.raises(ValueError, match="--device"):
        ExtractRun(out_dir="x", device="tpu")


def test_resume_with_other_settings_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "store"
    real_write = extract_mod.write_chunk
    n_written = []

    def crash_after_two(*a, **k):
        if len(n_written) == 2:
            raise KeyboardInterrupt  # a crash half-way through the run
        n_written.append(1)
        return real_write(*a, **k)

    monkeypatch.setattr(extract_mod, "write_chunk", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        extract(ExtractConfig(**DIGITS), _run(out, chunk_size=256))
    monkeypatch.setattr(extract_mod, "write_chunk", real_write)
    assert not out.exists() and len(list((partial_dir(out) / "chunks").glob("chunk-*.npz"))) == 2
    with pytest.raises(ArtifactError, match=r"different settings \(.*batch_size: 64 -> 32.*--overwrite"):
        extract(ExtractConfig(**{**DIGITS, "batch_size": 32}), _run(out, chunk_size=256))
    with pytest.raises(ArtifactError, match=r"different settings \(chunk_size: 256 -> 512"):
        extract(ExtractConfig(**DIGITS), _run(out, chunk_size=512))
    s = extract(ExtractConfig(**{**DIGITS, "batch_size": 32}), _run(out, chunk_size=256, overwrite=True))
    assert s.n == 1797 and s.config["batch_size"] == 32


def test_nan_embeddings_name_the_images(tmp_path, monkeypatch):
    from embeddings.backbone import Backbone

    real = Backbone.features

    def poisoned(self, batch):
        out = real(self, batch).clone()
        if out.shape[0] < 8:  # the backbone's own width probe
            return out
        out[3] = float("nan")
        out[7, 0] = float("inf")
        return out

    monkeypatch.setattr(Backbone, "features", poisoned)
    out = tmp_path / "store"
    with pytest.raises(ExtractError, match=r"2 image\(s\): 3, 7;"):
        extract(ExtractConfig(**DIGITS), _run(out))
    assert not out.exists()
    assert not list((partial_dir(out) / "chunks").glob("chunk-*.npz"))  # nothing stored for the bad chunk


# ------------------------------------------------------------------------------------------ image folders


def _png_header_only(width, height):
    """A PNG whose header claims ``width x height`` pixels: a decompression bomb for any reader that trusts it."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _bad_zoo_folder(root):
    rng = np.random.default_rng(0)
    good = {}
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
    rgb = lambda: Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))  # noqa: E731
    rgb().save(root / "cat" / "a.jpg", quality=90)
    rgb().convert("L").save(root / "cat" / "grey.png")
    rgb().convert("P").save(root / "cat" / "palette.png")
    rgb().convert("RGBA").save(root / "cat" / "rgba.png")
    rgb().convert("CMYK").save(root / "dog" / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (30, 30), dtype=np.uint16)).save(root / "dog" / "sixteen.png")
    rgb().save(root / "dog" / "b.png")
    good = ["cat/a.jpg", "cat/grey.png", "cat/palette.png", "cat/rgba.png", "dog/b.png", "dog/cmyk.jpg", "dog/sixteen.png"]
    # the zoo
    (root / "cat" / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    rgb().save(buf, format="PNG")
    (root / "dog" / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "dog" / "text.jpg").write_text("this is not an image\n")
    (root / "cat" / "bomb.png").write_bytes(_png_header_only(20000, 20000))
    (root / "dog" / "readme.txt").write_text("not a row\n")
    return good


def test_bad_input_zoo_is_skipped_and_recorded(tmp_path):
    root = tmp_path / "images"
    good = _bad_zoo_folder(root)
    # one decode worker, so that skip markers really come back from another process
    cfg = ExtractConfig(source=str(root), backbone="digits-cnn", weights="random", batch_size=4)
    s = extract(cfg, _run(tmp_path / "store", chunk_size=8, num_workers=1))
    assert s.ids == good
    assert s.classes == ["cat", "dog"] and s.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert np.isfinite(np.asarray(s.x)).all() and s.x.shape[0] == len(good)
    reasons = {e["id"]: e["reason"] for e in s.skipped}
    assert set(reasons) == {"cat/empty.jpg", "dog/truncated.png", "dog/text.jpg", "cat/bomb.png", "dog/readme.txt"}
    assert reasons["cat/empty.jpg"] == "zero bytes"
    assert "truncated" in reasons["dog/truncated.png"]
    assert reasons["dog/text.jpg"] == "not an image"
    assert "decompression bomb" in reasons["cat/bomb.png"]
    assert s.meta["n_skipped"] == 5 and s.split == {}


def test_image_folder_with_a_timm_model_and_requested_split(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    rng = np.random.default_rng(1)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)).save(root / f"{i:02d}.jpg")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    cfg = ExtractConfig(source=str(root), backbone="test_resnet", weights="random", batch_size=4,
                        val_fraction=0.2, test_fraction=0.2)
    s = extract(cfg, _run(tmp_path / "store", chunk_size=4))
    assert s.n == 10 and s.ids == [f"{i:02d}.jpg" for i in range(10)] and (s.labels == -1).all()
    assert [e["id"] for e in s.skipped] == ["broken.jpg"]
    # split indices are store rows: the broken input dropped out of its split
    rows = np.concatenate([s.split[k] for k in ("train", "val", "test")])
    assert sorted(rows.tolist()) == list(range(10))
    assert s.meta["backbone"] == "test_resnet" and s.meta["weights_source"] is not None


def test_a_transform_that_does_not_split_extracts_the_same(tmp_path, monkeypatch):
    """The fallback (full float transform per image, no batch step) gives the split path's embeddings."""
    import dataclasses

    root = tmp_path / "flat"
    root.mkdir()
    rng = np.random.default_rng(2)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)).save(root / f"{i:02d}.jpg")
    cfg = ExtractConfig(source=str(root), backbone="test_resnet", weights="random", batch_size=3)
    split = extract(cfg, _run(tmp_path / "split", chunk_size=3))

    real = extract_mod.load_backbone

    def unsplittable(*a, **k):
        b = real(*a, **k)
        return dataclasses.replace(b, transform=lambda im, t=b.transform: t(im))  # not a Compose: no split

    monkeypatch.setattr(extract_mod, "load_backbone", unsplittable)
    whole = extract(cfg, _run(tmp_path / "whole", chunk_size=3, num_workers=1))
    np.testing.assert_allclose(np.asarray(whole.x), np.asarray(split.x), rtol=1e-5, atol=1e-5)


def test_decoding_on_threads_gives_the_batches_of_one_thread(tmp_path):
    """In-process decoding runs on a thread per torch thread; order, pixels and skip reasons must not change."""
    import torch

    from embeddings.backbone import load_backbone

    root = tmp_path / "images"
    _bad_zoo_folder(root)
    rng = np.random.default_rng(3)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (30 + i, 41, 3), dtype=np.uint8)).save(root / "cat" / f"r{i:02d}.jpg")
    source = open_source(str(root))
    dataset = loader_mod.RowDataset(source, load_backbone("test_resnet", weights="random").image_transform)
    batches = [list(range(i, min(i + 5, len(source)))) for i in range(0, len(source), 5)]
    sequential = [loader_mod.collate([dataset[r] for r in rows]) for rows in batches]
    n_threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        threaded = list(loader_mod.batches_in_process(dataset, batches, pin=False))
    finally:
        torch.set_num_threads(n_threads)
    assert torch.get_num_threads() == n_threads
    assert len(threaded) == len(sequential)
    for a, b in zip(threaded, sequential):
        assert a["rows"].tolist() == b["rows"].tolist() and a["reasons"] == b["reasons"]
        assert a["ok"].tolist() == b["ok"].tolist()
        assert (a["images"] is None) == (b["images"] is None)
        if a["images"] is not None:
            assert a["images"].dtype == torch.uint8 and torch.equal(a["images"], b["images"])
    assert any(r for batch in threaded for r in batch["reasons"])  # the zoo's bad files were in there
