"""Image sources: folder layouts, file lists, labels and classes, deterministic order, seeded stratified splits."""

import json
import os
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from embeddings.images import BadImage
from embeddings.sources import guess_folder_kind, open_source, stratified_split


def _png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), (value, 255 - value, 7)).save(path)


def _tree(root, files):
    """Write ``{relative path: grey value or None for a text file}``, in the given order."""
    for rel, value in files:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if value is None:
            p.write_text("not an image")
        else:
            Image.new("RGB", (4, 3), (value, 255 - value, 7)).save(p, format="PNG")


def _first_pixel(source, i):
    return source.load(i).getpixel((0, 0))


# ------------------------------------------------------------------------------------------- folders


def test_image_folder_labels_classes_ids(tmp_path):
    root = tmp_path / "train"
    _tree(root, [
        ("dog/c.PNG", 30), ("cat/sub/b.jpg", 20), ("cat/a.png", 10), ("dog/readme.txt", None),
        ("notes.txt", None), (".hidden/x.png", 1), ("cat/.DS_Store", None),
    ])
    (root / "empty").mkdir()
    src = open_source(root)
    assert src.kind == "imagefolder" and len(src) == 3
    assert src.classes == ["cat", "dog", "empty"]  # every class folder, sorted, even an empty one
    assert src.ids == ["cat/a.png", "cat/sub/b.jpg", "dog/c.PNG"]
    assert src.labels.dtype == np.int64 and src.labels.tolist() == [0, 0, 1]
    assert [_first_pixel(src, i)[0] for i in range(3)] == [10, 20, 30]
    assert src.ignored == [
        {"id": ".hidden/", "reason": "hidden folder (name starts with '.'); its files were not read"},
        {"id": "cat/.DS_Store", "reason": "hidden file (name starts with '.'); not read"},
        {"id": "dog/readme.txt", "reason": "not an image file (extension .txt)"},
        {"id": "notes.txt", "reason": "outside the class folders"},
    ]
    assert src.split == {}
    desc = src.describe()
    json.dumps(desc)
    assert desc["kind"] == "imagefolder" and desc["n"] == 3 and desc["n_classes"] == 3 and desc["n_ignored"] == 4


def test_class_order_is_by_folder_name_then_path(tmp_path):
    _tree(tmp_path, [("a-b/y.png", 2), ("a/z.png", 1), ("a/x/w.png", 0)])
    src = open_source(tmp_path)
    assert src.classes == ["a", "a-b"]
    assert src.ids == ["a/x/w.png", "a/z.png", "a-b/y.png"]
    assert src.labels.tolist() == [0, 0, 1]


def test_flat_folder_is_recursive_and_unlabelled(tmp_path):
    _tree(tmp_path, [("z.png", 3), ("sub/b.png", 2), ("a.JPG", 1), ("x.txt", None)])
    src = open_source(tmp_path)
    assert src.kind == "flat"
    assert src.ids == ["a.JPG", "sub/b.png", "z.png"]
    assert src.labels.tolist() == [-1, -1, -1] and src.classes == []
    assert src.ignored == [{"id": "x.txt", "reason": "not an image file (extension .txt)"}]
    assert [_first_pixel(src, i)[0] for i in range(3)] == [1, 2, 3]


def test_kind_can_be_forced(tmp_path):
    _tree(tmp_path, [("cat/a.png", 1), ("dog/b.png", 2)])
    assert guess_folder_kind(tmp_path) == "imagefolder"
    flat = open_source(tmp_path, kind="flat")
    assert flat.kind == "flat" and flat.ids == ["cat/a.png", "dog/b.png"] and flat.classes == []
    with pytest.raises(ValueError, match="--kind"):
        open_source(tmp_path, kind="pictures")
    with pytest.raises(ValueError, match="filelist"):
        open_source(tmp_path, kind="filelist")


def test_bad_files_with_image_extensions_are_rows_that_fail_to_load(tmp_path):
    _tree(tmp_path, [("good.png", 5), ("text.jpg", None)])
    (tmp_path / "empty.png").write_bytes(b"")
    src = open_source(tmp_path)
    assert src.ids == ["empty.png", "good.png", "text.jpg"]
    reasons = []
    for i in range(len(src)):
        try:
            src.load(i)
            reasons.append(None)
        except BadImage as e:
            reasons.append(e.reason)
    assert reasons == ["zero bytes", None, "not an image"]


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "b c", "B"]), st.sampled_from(["", "s/", "s/t/"]),
                          st.text("xyz09_-", min_size=1, max_size=4), st.sampled_from([".png", ".PNG", ".jpg"])),
                min_size=1, max_size=8, unique_by=lambda t: (t[0], t[1], t[2].lower(), t[3].lower())),
       st.randoms(use_true_random=False))
def test_order_does_not_depend_on_creation_order(tmp_path_factory, entries, rnd):
    files = [f"{c}/{sub}{stem}{ext}" for c, sub, stem, ext in entries]
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    for root in (one, two):
        order = list(files)
        rnd.shuffle(order)
        for rel in order:
            _png(root / rel)
    a, b = open_source(one), open_source(two)
    assert a.ids == b.ids and a.labels.tolist() == b.labels.tolist() and a.classes == b.classes
    assert sorted(a.ids) == sorted(files)
    assert a.classes == sorted({c for c, *_ in entries})
    assert all(a.ids[i].split("/")[0] == a.classes[a.labels[i]] for i in range(len(a)))
    assert list(a.labels) == sorted(a.labels)


# ------------------------------------------------------------------------------------------- file lists


@pytest.fixture
def images_dir(tmp_path):
    _tree(tmp_path / "imgs", [("a.png", 10), ("b b.png", 20), ("c.png", 30), ("d.png", 40)])
    return tmp_path / "imgs"


def test_txt_list_with_integer_labels_and_relative_paths(tmp_path, images_dir):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "l.txt").write_text(
        "# a comment\n../imgs/a.png 3\n\n../imgs/b b.png\t1\n../imgs/c.png\n../imgs/notes.txt 2\n"
        f"{images_dir / 'd.png'} 0\n"
    )
    src = open_source(lists / "l.txt")
    assert src.kind == "filelist"
    assert src.ids == ["../imgs/a.png", "../imgs/b b.png", "../imgs/c.png", str(images_dir / "d.png")]
    assert src.labels.tolist() == [3, 1, -1, 0]
    assert src.classes == ["0", "1", "2", "3"]
    assert [_first_pixel(src, i)[0] for i in range(4)] == [10, 20, 30, 40]
    assert src.ignored == [{"id": "../imgs/notes.txt", "reason": "not an image file (extension .txt)"}]


def test_txt_list_without_labels_and_with_class_names(tmp_path, images_dir):
    (images_dir / "plain.txt").write_text("a.png\nc.png\n")
    plain = open_source(images_dir / "plain.txt")
    assert plain.labels.tolist() == [-1, -1] and plain.classes == []
    (images_dir / "named.txt").write_text("a.png dog\nb b.png cat\nc.png dog\n")
    named = open_source(images_dir / "named.txt")
    assert named.classes == ["cat", "dog"] and named.labels.tolist() == [1, 0, 1]


@pytest.mark.parametrize(
    "text,labels,classes",
    [
        ("path,label\na.png,2\nc.png,0\n", [2, 0], ["0", "1", "2"]),
        ("a.png,2\nc.png,0\n", [2, 0], ["0", "1", "2"]),
        ("label,path,extra\nzebra,a.png,x\nant,c.png,y\n", [1, 0], ["ant", "zebra"]),
        ("path\na.png\nc.png\n", [-1, -1], []),
        ("a.png\nc.png,\n", [-1, -1], []),
    ],
)
def test_csv_lists(images_dir, text, labels, classes):
    (images_dir / "l.csv").write_text(text)
    src = open_source(images_dir / "l.csv")
    assert src.ids == ["a.png", "c.png"]
    assert src.labels.tolist() == labels and src.classes == classes
    assert [_first_pixel(src, i)[0] for i in range(2)] == [10, 30]


def test_pinned_classes_keep_label_numbers_across_lists(images_dir):
    (images_dir / "val.csv").write_text("path,label\na.png,dog\nc.png,dog\n")
    src = open_source(images_dir / "val.csv", classes=["cat", "dog"])
    assert src.classes == ["cat", "dog"] and src.labels.tolist() == [1, 1]
    with pytest.raises(ValueError, match="'bird'"):
        (images_dir / "bad.csv").write_text("a.png,bird\n")
        open_source(images_dir / "bad.csv", classes=["cat", "dog"])


def test_missing_listed_files_are_rows_that_fail_to_load(images_dir):
    (images_dir / "l.txt").write_text("a.png\ngone.png\n")
    src = open_source(images_dir / "l.txt")
    assert len(src) == 2
    with pytest.raises(BadImage) as info:
        src.load(1)
    assert info.value.reason == "file not found"


def test_bad_specs_say_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="digits"):
        open_source(tmp_path / "nowhere")
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(ValueError, match="--kind filelist"):
        open_source(tmp_path / "x.json")
    with pytest.raises(ValueError, match="--val-fraction"):
        open_source(tmp_path, val_fraction=1.5)
    with pytest.raises(ValueError, match="--test-fraction"):
        open_source(tmp_path, val_fraction=0.5, test_fraction=0.5)


# ------------------------------------------------------------------------------------------- splits


def test_folder_split_is_stratified_seeded_disjoint_and_covering(tmp_path):
    files = [(f"c{c}/{i:02d}.png", i) for c in range(3) for i in range(10 * (c + 1))]
    random.Random(0).shuffle(files)
    _tree(tmp_path, files)
    src = open_source(tmp_path, seed=3, val_fraction=0.2, test_fraction=0.1)
    rows = np.concatenate([src.split[k] for k in ("train", "val", "test")])
    assert sorted(rows.tolist()) == list(range(len(src)))
    for c, n_c in enumerate((10, 20, 30)):
        assert np.sum(src.labels[src.split["val"]] == c) == round(0.2 * n_c)
        assert np.sum(src.labels[src.split["test"]] == c) == round(0.1 * n_c)
    again = open_source(tmp_path, seed=3, val_fraction=0.2, test_fraction=0.1)
    other = open_source(tmp_path, seed=4, val_fraction=0.2, test_fraction=0.1)
    assert all(np.array_equal(src.split[k], again.split[k]) for k in src.split)
    assert not np.array_equal(src.split["val"], other.split["val"])
    desc = src.describe()
    assert (desc["n_train"], desc["n_val"], desc["n_test"]) == (len(src.split["train"]), 12, 6)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(-1, 4), min_size=0, max_size=80), st.integers(0, 2**31 - 1),
       st.floats(0, 0.45), st.floats(0, 0.45))
def test_stratified_split_laws(labels, seed, val_fraction, test_fraction):
    labels = np.array(labels, dtype=np.int64)
    split = stratified_split(labels, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    assert set(split) == {"train", "val", "test"}
    allrows = np.concatenate(list(split.values()))
    assert sorted(allrows.tolist()) == list(range(len(labels)))  # disjoint and covering
    for rows in split.values():
        assert rows.dtype == np.int64 and np.all(np.diff(rows) > 0)
    for c in np.unique(labels):
        n_c = int(np.sum(labels == c))
        n_test = round(n_c * test_fraction)
        assert np.sum(labels[split["test"]] == c) == n_test
        assert np.sum(labels[split["val"]] == c) == min(round(n_c * val_fraction), n_c - n_test)
    again = stratified_split(labels, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    assert all(np.array_equal(split[k], again[k]) for k in split)


def test_symlinked_class_folders_are_followed_without_loops(tmp_path):
    _tree(tmp_path / "real", [("x.png", 1)])
    root = tmp_path / "root"
    (root / "cls").mkdir(parents=True)
    _png(root / "cls" / "y.png")
    os.symlink(tmp_path / "real", root / "linked")
    os.symlink(root / "cls", root / "cls" / "loop")
    src = open_source(root)
    assert src.classes == ["cls", "linked"]
    assert src.ids == ["cls/y.png", "linked/x.png"]


def test_imagenet_split_of_a_class_too_small_names_a_fix_that_exists():
    from embeddings.imagenet import imagenet_split

    labels = np.array([0] * 60 + [1] * 50)
    with pytest.raises(ValueError) as e:
        imagenet_split(labels, n_val=0, seed=0)
    message = str(e.value)
    assert "class 1 has 50 train images" in message
    assert "--test-per-class" not in message  # no script has that flag
    assert "more than 50" in message


def test_integer_labels_of_a_list_may_not_imply_a_million_classes(tmp_path, images_dir):
    (tmp_path / "list.txt").write_text("images/a.png 3\nimages/b.png 1000000\n")
    with pytest.raises(ValueError, match=r"list\.txt: integer label 1000000 would imply 1000001 classes for 2 "
                                         r"images"):
        open_source(tmp_path / "list.txt")
    (tmp_path / "list.txt").write_text("images/a.png 3\nimages/b.png 255\n")
    assert len(open_source(tmp_path / "list.txt").classes) == 256  # one byte's worth of classes is always fine


# ------------------------------------------------------------------------------------------- folder fingerprints


def test_folder_fingerprint_changes_with_the_images_and_not_with_their_creation_order(tmp_path):
    from embeddings.fingerprints import folder_fingerprint

    a, b = tmp_path / "a", tmp_path / "b"
    _tree(a, [("cat/1.png", 10), ("dog/2.png", 20), ("notes.txt", None)])
    _tree(b, [("notes.txt", None), ("dog/2.png", 20), ("cat/1.png", 10)])
    first = folder_fingerprint(a)
    assert first == folder_fingerprint(b) and first["by_content"] and first["n_files"] == 3
    # replaced by another image of the same size, with the old modification time: only the content tells
    stat = (a / "cat/1.png").stat()
    Image.new("RGB", (4, 3), (11, 244, 7)).save(a / "cat/1.png", format="PNG")
    assert (a / "cat/1.png").stat().st_size == stat.st_size
    os.utime(a / "cat/1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    replaced = folder_fingerprint(a)
    assert replaced["sha256"] != first["sha256"]
    _png(a / "dog/3.png", 30)
    added = folder_fingerprint(a)
    assert added["sha256"] != replaced["sha256"] and added["n_files"] == 4
    (a / "dog/3.png").rename(a / "dog/.3.png")  # hidden now: not read, but recorded by name in the store
    hidden = folder_fingerprint(a)
    assert hidden["sha256"] not in (added["sha256"], replaced["sha256"])
    os.utime(a / "cat/1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same content
    assert folder_fingerprint(a) == hidden


def test_a_large_folder_is_fingerprinted_by_sizes_and_modification_times(tmp_path):
    from embeddings.fingerprints import folder_fingerprint

    _tree(tmp_path / "f", [("1.png", 10), ("2.png", 20)])
    before = folder_fingerprint(tmp_path / "f", hash_limit_bytes=0)
    assert not before["by_content"]
    stat = (tmp_path / "f" / "1.png").stat()
    os.utime(tmp_path / "f" / "1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert folder_fingerprint(tmp_path / "f", hash_limit_bytes=0)["sha256"] != before["sha256"]
    with pytest.raises(ValueError, match="is not a folder"):
        folder_fingerprint(tmp_path / "f" / "1.png")
