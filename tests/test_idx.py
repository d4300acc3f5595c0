"""IDX files: reading, the torchvision and flat layouts, .gz, clear errors, and the paper's split."""

import gzip
import tracemalloc

import numpy as np
import pytest

from embeddings.idx import IdxError, IdxSource, find_idx_files, read_idx, write_idx
from embeddings.sources import open_source


def make_idx_set(folder, n_train=60, n_test=12, side=28, gz=False, seed=0):
    """Four IDX files of random images whose labels cycle through 0..9."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, side, side), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        data[prefix] = (images, labels)
    return data


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32, np.float64])
def test_round_trip_of_every_type(tmp_path, dtype):
    a = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    if dtype == np.uint8:
        a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.idx", a)
    out = read_idx(tmp_path / "a.idx")
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, a)


def test_gz_reads_like_the_plain_file(tmp_path):
    a = np.arange(100, dtype=np.uint8).reshape(4, 5, 5)
    write_idx(tmp_path / "a.idx", a)
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress((tmp_path / "a.idx").read_bytes()))
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx.gz"), a)


def test_truncated_file_is_a_clear_error(tmp_path):
    write_idx(tmp_path / "a.idx", np.zeros((10, 28, 28), np.uint8))
    raw = (tmp_path / "a.idx").read_bytes()
    (tmp_path / "a.idx").write_bytes(raw[:-100])
    with pytest.raises(IdxError, match=r"a.idx is truncated.*\(10, 28, 28\)"):
        read_idx(tmp_path / "a.idx")


def test_header_that_does_not_match_the_size_is_a_clear_error(tmp_path):
    write_idx(tmp_path / "a.idx", np.zeros((3, 4), np.uint8))
    (tmp_path / "a.idx").write_bytes((tmp_path / "a.idx").read_bytes() + b"\x00" * 7)
    with pytest.raises(IdxError, match="longer than its header says"):
        read_idx(tmp_path / "a.idx")


@pytest.mark.parametrize("raw, match", [(b"\x01\x00\x08\x01", "not an IDX file"), (b"\x00\x00\x07\x01", "type byte"),
                                        (b"\x00\x00\x08\x03\x00\x00", "header promises 3")])
def test_bad_headers_name_the_problem(tmp_path, raw, match):
    (tmp_path / "x.idx").write_bytes(raw)
    with pytest.raises(IdxError, match=match):
        read_idx(tmp_path / "x.idx")


def test_corrupt_gz_is_a_clear_error(tmp_path):
    (tmp_path / "x-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(IdxError, match="cannot read IDX file"):
        read_idx(tmp_path / "x-images-idx3-ubyte.gz")


@pytest.mark.parametrize("layout", ["flat", "raw", "torchvision"])
def test_layouts_are_found(tmp_path, layout):
    folder = {"flat": tmp_path, "raw": tmp_path / "raw", "torchvision": tmp_path / "MNIST" / "raw"}[layout]
    make_idx_set(folder, gz=layout == "torchvision")
    files = find_idx_files(tmp_path)
    assert set(files) == {"train_images", "train_labels", "test_images", "test_labels"}
    assert all(p.parent == folder for p in files.values())


def test_partial_set_names_the_missing_files(tmp_path):
    make_idx_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(IdxError, match="missing t10k-labels-idx1-ubyte"):
        find_idx_files(tmp_path)


def test_no_set_is_a_clear_error(tmp_path):
    with pytest.raises(IdxError, match="no IDX data set"):
        find_idx_files(tmp_path)


def test_images_and_labels_of_different_lengths_are_refused(tmp_path):
    make_idx_set(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(59, np.uint8))
    with pytest.raises(IdxError, match="60 images but .* 59 labels"):
        IdxSource(tmp_path)


def test_source_rows_ids_and_the_paper_split(tmp_path):
    data = make_idx_set(tmp_path, n_train=60, n_test=12)
    source = open_source(tmp_path, kind="idx", seed=3)
    assert isinstance(source, IdxSource) and len(source) == 72
    assert source.ids[0] == "train/0" and source.ids[60] == "t10k/0"
    np.testing.assert_array_equal(np.asarray(source.load(61))[..., 0], data["t10k"][0][1])
    split = source.split
    np.testing.assert_array_equal(split["test"], np.arange(60, 72))
    assert len(split["val"]) == 10 and len(split["train"]) == 50  # a sixth of the train file, stratified
    assert np.bincount(source.labels[split["val"]]).tolist() == [1] * 10
    assert set(split["train"]) | set(split["val"]) == set(range(60))
    again = open_source(tmp_path, kind="idx", seed=3).split
    other = open_source(tmp_path, kind="idx", seed=4).split
    np.testing.assert_array_equal(again["val"], split["val"])
    assert not np.array_equal(other["val"], split["val"])


def test_a_root_with_several_data_sets_is_refused_naming_them(tmp_path):
    # torchvision's root often holds MNIST/raw, FashionMNIST/raw, KMNIST/raw: picking one by name order would run
    # the study on a data set the user did not ask for.
    make_idx_set(tmp_path / "MNIST" / "raw", n_train=20, n_test=10)
    make_idx_set(tmp_path / "FashionMNIST" / "raw", n_train=20, n_test=10, seed=1)
    with pytest.raises(IdxError, match="FashionMNIST.*MNIST"):
        find_idx_files(tmp_path)
    assert find_idx_files(tmp_path / "MNIST")["train_images"].parent == tmp_path / "MNIST" / "raw"


# ------------------------------------------------------------------------------------------- crafted sizes


def _header(type_byte, shape):
    return bytes([0, 0, type_byte, len(shape)]) + np.asarray(shape, ">u4").tobytes()


def test_a_huge_label_is_refused_before_any_class_list_is_built(tmp_path):
    # A million stands in for a billion (7 GB of class names): the same refusal, and a reader that lost the bound
    # costs this test 60 MB rather than the machine its memory.
    make_idx_set(tmp_path, n_train=20, n_test=10)
    labels = (np.arange(20) % 10).astype(np.int32)
    labels[7] = 10**6
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    with pytest.raises(IdxError, match=r"train-labels-idx1-ubyte: label 1000000 would imply 1000001 classes "
                                       r"for 30 images; IDX labels are class numbers below 256"):
        IdxSource(tmp_path)


def test_a_header_whose_sizes_overflow_is_refused_naming_the_sizes(tmp_path):
    # Four sizes of 2^32 - 1: their product in int64 wraps around, to a negative byte count.
    (tmp_path / "a.idx").write_bytes(_header(0x08, (2**32 - 1,) * 4) + b"\0" * 64)
    with pytest.raises(IdxError, match=r"a\.idx is truncated: its header says shape \(4294967295, 4294967295, "
                                       r"4294967295, 4294967295\) of uint8 \(\d{38,} bytes with the header\)"):
        read_idx(tmp_path / "a.idx")


def test_a_gz_is_inflated_no_further_than_its_header_says(tmp_path):
    """A few hundred kB of zeros inflating to 256 MiB under a header of 100 bytes: refused after reading 101 bytes,
    never inflated in memory."""
    path = tmp_path / "bomb-images-idx3-ubyte.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(_header(0x08, (1, 10, 10)))
        zeros = bytes(1 << 24)
        for _ in range(16):
            f.write(zeros)
    assert path.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(IdxError, match=r"bomb-images-idx3-ubyte\.gz is longer than its header says"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_a_gz_header_promising_more_than_deflate_can_give_is_refused_at_once(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(_header(0x08, (60000, 2000, 2000)) + b"\0" * 100))
    with pytest.raises(IdxError, match=r"x\.gz is corrupt: .* more than its \d+ compressed bytes can inflate to"):
        read_idx(path)


def test_empty_files_and_an_empty_test_set_are_clear_errors(tmp_path):
    make_idx_set(tmp_path, n_train=20, n_test=10)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(IdxError, match=r"t10k-images-idx3-ubyte is empty \(0 bytes\); download it again"):
        IdxSource(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(0, np.uint8))
    with pytest.raises(IdxError, match=r"t10k-images-idx3-ubyte and .*t10k-labels-idx1-ubyte hold no images"):
        IdxSource(tmp_path)


def test_idx_errors_are_the_toolkits_own(tmp_path):
    from artifacts import ArtifactError

    (tmp_path / "x.idx").write_bytes(b"\x00\x00")
    with pytest.raises(ArtifactError):
        read_idx(tmp_path / "x.idx")
