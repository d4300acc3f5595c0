"""MNIST-format IDX files on disk: the reader, where the four files of a data set are, and an image source.

IDX (LeCun et al.'s MNIST distribution format): two zero bytes, a type byte, the number of dimensions ``nd``,
then ``nd`` big-endian uint32 sizes, then the values in C order, big-endian. MNIST, Fashion-MNIST, KMNIST and
EMNIST all ship as four files::

    train-images-idx3-ubyte   train-labels-idx1-ubyte   t10k-images-idx3-ubyte   t10k-labels-idx1-ubyte

each optionally gzipped (``.gz``), and some mirrors write ``train-images.idx3-ubyte``. They are found in ``DIR``
itself, in ``DIR/raw``, or in ``DIR/<Name>/raw`` (the layout torchvision's ``MNIST(root=DIR)`` downloads into).
Nothing is fetched. A file whose byte count does not match its header (truncated, or with trailing bytes), an
unknown type byte, or images and labels of different lengths is an ``IdxError`` naming the file.

The split is the paper's (Section 4: 50k train / 10k validation / 10k test for MNIST): the test split is the
``t10k`` file; a seeded, label-stratified sixth of the ``train`` file is validation; the rest is train.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from artifacts import ArtifactError, sha256_file
from embeddings.source_base import ImageSource, max_classes, stratified_split

IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
"""IDX type byte -> numpy dtype (big-endian)."""
PARTS = {"train_images": ("train", "images", 3), "train_labels": ("train", "labels", 1),
         "test_images": ("t10k", "images", 3), "test_labels": ("t10k", "labels", 1)}
"""The four files of a data set: (prefix, what, number of dimensions)."""
VAL_FRACTION = 1 / 6
"""Share of the train file held out as validation: 10k of MNIST's 60k, the paper's split."""


class IdxError(ArtifactError, ValueError):
    """An IDX file or folder that can't be read as the data set it should be."""


MAX_INFLATION = 1032
"""Most bytes one compressed byte can inflate to (deflate's limit is about 1032:1): a ``.gz`` whose header promises
more is refused before anything is read."""
_BLOCK = 1 << 22


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in one IDX file (``.gz`` is decompressed as a stream), in native byte order.

    The header is read first and decides everything that is allocated: a plain file must be exactly as long as
    its header says before its data is read; a ``.gz`` is inflated into an array of the header's size, never
    further (one byte more is an error), and a header promising more than ``MAX_INFLATION`` times the compressed
    size is refused at once.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            raise IdxError(f"{path} is empty (0 bytes); download it again")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            return _read_idx_stream(f, path, size, compressed=path.suffix == ".gz")
    except (OSError, EOFError, zlib.error) as e:
        raise IdxError(f"cannot read IDX file {path} ({type(e).__name__}: {e})") from e


def _read_idx_stream(f, path: Path, size: int, compressed: bool) -> np.ndarray:
    head = f.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise IdxError(f"{path} is not an IDX file: it must start with two zero bytes, a type byte and a rank")
    type_byte, ndim = head[2], head[3]
    if type_byte not in IDX_TYPES:
        raise IdxError(f"{path}: unknown IDX type byte 0x{type_byte:02x} (known: "
                       + ", ".join(f"0x{t:02x}" for t in IDX_TYPES) + ")")
    dims = f.read(4 * ndim)
    if ndim == 0 or len(dims) < 4 * ndim:
        raise IdxError(f"{path}: header promises {ndim} dimensions but the file has only {4 + len(dims)} bytes")
    shape = tuple(int.from_bytes(dims[4 * i : 4 * i + 4], "big") for i in range(ndim))
    dtype = np.dtype(IDX_TYPES[type_byte])
    header = 4 + 4 * ndim
    n_data = math.prod(shape) * dtype.itemsize  # exact: a product of four 32-bit sizes overflows int64
    expected = header + n_data
    described = f"its header says shape {shape} of {dtype.name} ({expected} bytes with the header)"
    if not compressed and size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise IdxError(f"{path} is {what}: {described} but it holds {size} bytes; download it again")
    if compressed and expected > MAX_INFLATION * size + 1024:
        raise IdxError(f"{path} is corrupt: {described}, more than its {size} compressed bytes can inflate to; "
                       f"download it again")
    data = np.empty(n_data, dtype=np.uint8)
    view, at = memoryview(data), 0
    while at < n_data:
        n_read = f.readinto(view[at : at + _BLOCK])
        if not n_read:
            raise IdxError(f"{path} is truncated: {described} but it inflates to {header + at} bytes; download it "
                           f"again")
        at += n_read
    if f.read(1):
        raise IdxError(f"{path} is longer than its header says: {described}; download it again")
    return data.view(dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _candidates(prefix: str, what: str, ndim: int) -> list[str]:
    names = [f"{prefix}-{what}-idx{ndim}-ubyte", f"{prefix}-{what}.idx{ndim}-ubyte"]
    return names + [n + ".gz" for n in names]


def find_idx_files(data_dir: str | os.PathLike) -> dict[str, Path]:
    """The paths of the four files (keys of ``PARTS``) in ``data_dir``, ``data_dir/raw`` or ``data_dir/*/raw``."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise IdxError(f"--data {data_dir} is not a folder; pass the folder holding the IDX files "
                       f"(or torchvision's root)")
    folders = [data_dir, data_dir / "raw"] + sorted(p / "raw" for p in data_dir.iterdir() if p.is_dir())
    complete = []
    for folder in folders:
        if not folder.is_dir():
            continue
        found = {}
        for part, spec in PARTS.items():
            hit = next((folder / n for n in _candidates(*spec) if (folder / n).is_file()), None)
            if hit is not None:
                found[part] = hit
        if len(found) == len(PARTS):
            if folder in folders[:2]:
                return found
            complete.append(found)
        elif found:
            missing = [_candidates(*PARTS[p])[0] for p in PARTS if p not in found]
            raise IdxError(f"{folder} holds only part of an IDX data set: missing {', '.join(missing)} (or .gz)")
    if len(complete) > 1:  # a torchvision root with several data sets: never pick one by name order
        names = [next(iter(found.values())).parent.parent.name for found in complete]
        raise IdxError(f"{data_dir} holds several IDX data sets ({', '.join(names)}); pass the one to use, e.g. "
                       f"--data {data_dir / names[0]}")
    if complete:
        return complete[0]
    raise IdxError(
        f"no IDX data set in {data_dir}: expected train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        f"t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (optionally .gz) in it, in raw/, or in <Name>/raw/"
    )


def idx_fingerprint(data_dir: str | os.PathLike) -> dict[str, str]:
    """The SHA-256 of each of the four files (keys of ``PARTS``): what a cache keys on, so that other files put in
    the same folder are never taken for the old ones."""
    return {part: sha256_file(path) for part, path in find_idx_files(data_dir).items()}


def _images_and_labels(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise IdxError(f"{images_path}: expected uint8 images of shape (n, h, w), got {images.dtype} {images.shape}")
    if labels.ndim != 1:
        raise IdxError(f"{labels_path}: expected a vector of labels, got shape {labels.shape}")
    if len(images) != len(labels):
        raise IdxError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    if len(images) == 0:
        raise IdxError(f"{images_path} and {labels_path} hold no images: a data set needs rows in both the train "
                       f"and the t10k file; download them again")
    if len(labels) and labels.min() < 0:
        raise IdxError(f"{labels_path}: labels must be >= 0, found {labels.min()}")
    return images, labels.astype(np.int64)


def idx_split(train_labels: np.ndarray, n_test: int, seed: int, val_fraction: float = VAL_FRACTION) -> dict:
    """Rows ``0..n_train-1`` are the train file, the rest the test file: a seeded stratified share of the train
    file becomes ``val``, the test file is ``test``."""
    inner = stratified_split(train_labels, seed=seed, val_fraction=val_fraction, test_fraction=0.0)
    n_train = len(train_labels)
    return {"train": inner["train"], "val": inner["val"],
            "test": np.arange(n_train, n_train + n_test, dtype=np.int64)}


class IdxSource(ImageSource):
    """An IDX data set as an ``ImageSource``: the train file's rows, then the test file's; ids ``train/i`` and
    ``t10k/i``; class names are the label numbers."""

    kind = "idx"

    def __init__(self, data_dir: str | os.PathLike, seed: int = 0, val_fraction: float | None = None):
        self.files_by_part = files = find_idx_files(data_dir)
        self.root = Path(data_dir)
        train_x, train_y = _images_and_labels(files["train_images"], files["train_labels"])
        test_x, test_y = _images_and_labels(files["test_images"], files["test_labels"])
        if train_x.shape[1:] != test_x.shape[1:]:
            raise IdxError(f"train images are {train_x.shape[1:]} but test images are {test_x.shape[1:]}")
        self.images = np.concatenate([train_x, test_x])
        self.labels = np.concatenate([train_y, test_y])
        for path, labels in ((files["train_labels"], train_y), (files["test_labels"], test_y)):
            if labels.max() >= max_classes(len(self.labels)):
                raise IdxError(f"{path}: label {labels.max()} would imply {labels.max() + 1} classes for "
                               f"{len(self.labels)} images; IDX labels are class numbers below "
                               f"{max_classes(len(self.labels))}: the file is corrupt, download it again")
        self.seed = seed
        self.val_fraction = VAL_FRACTION if val_fraction is None else float(val_fraction)
        self.ids = [f"train/{i}" for i in range(len(train_y))] + [f"t10k/{i}" for i in range(len(test_y))]
        self.classes = [str(i) for i in range(int(self.labels.max()) + 1)] if len(self.labels) else []
        self.split = idx_split(train_y, len(test_y), seed, self.val_fraction)
        self.ignored = []

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i]).convert("RGB")

    def files(self) -> list[tuple[str, Path]]:
        return [(part, path) for part, path in self.files_by_part.items()]

    def describe(self) -> dict:
        return {
            "kind": self.kind, "root": str(self.root.resolve()), "n": len(self), "n_classes": len(self.classes),
            "files": {part: str(p.resolve()) for part, p in self.files_by_part.items()},
            "image_shape": list(self.images.shape[1:]), "seed": self.seed, "val_fraction": self.val_fraction,
            **{f"n_{name}": int(len(rows)) for name, rows in self.split.items()},
        }

    def __repr__(self) -> str:
        return f"IdxSource(root={str(self.root)!r}, n={len(self)})"


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzipped when the name ends in ``.gz``); used to make test data sets."""
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in IDX_TYPES.items()}
    dtype = array.dtype.newbyteorder("=")
    if dtype not in codes:
        raise ValueError(f"IDX has no type for {array.dtype}")
    header = bytes([0, 0, codes[dtype], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    body = header + array.astype(IDX_TYPES[codes[dtype]]).tobytes()
    Path(path).write_bytes(gzip.compress(body) if str(path).endswith(".gz") else body)
