"""The checked readers of an EmbeddingStore's files: a damaged, hand-edited or crafted file is an ``ArtifactError``
naming it and the fix, never numpy's or Python's own exception, and nothing is allocated beyond what the store's
own size justifies.

Each reader checks what its file must be (see ``embeddings.store`` for the layout): JSON of the right type,
integer labels between -1 and the number of classes (a label of 10^9 would make every per-class count allocate
gigabytes downstream), one string id per row, split indices that are integers in ``[0, n)``. ``split.npz`` is read
member by member with each member's size bounded by ``n`` rows before anything is allocated, so a crafted archive
cannot make numpy allocate what its header claims.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path

import numpy as np

from artifacts import ArtifactError, check_npy, read_json
from artifacts.npy import HEADER_ERRORS

SPLIT_NAMES = ("train", "val", "test")
_HEADER_BYTES = 1 << 16
"""More than any ``.npy`` header of a split holds (numpy refuses headers over 10,000 bytes)."""


def rebuild_hint(store_dir: Path) -> str:
    """What to run to rebuild a damaged store."""
    return (
        f"rebuild the store: rerun `python scripts/extract.py` with the settings in {store_dir / 'config.json'} "
        f"and `--out {store_dir} --overwrite`"
    )


def read_meta(store_dir: Path) -> dict:
    """``meta.json``: an object whose ``schema_version``, when present, is an integer."""
    meta = read_json(store_dir / "meta.json", expect=dict, hint=rebuild_hint(store_dir))
    version = meta.get("schema_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactError(
            f"{store_dir / 'meta.json'} has schema_version {version!r}, not an integer; {rebuild_hint(store_dir)}"
        )
    return meta


def read_embeddings(store_dir: Path) -> np.ndarray:
    """``embeddings.npy`` as a read-only memory map, after its header and size are checked: ``(n, d)`` float32 or
    float16."""
    path = store_dir / "embeddings.npy"
    _, dtype = check_npy(path, rebuild_hint(store_dir), kinds="f", ndim=2)
    if dtype not in (np.float32, np.float16):
        raise ArtifactError(f"{path} holds {dtype} where float32 or float16 belong; {rebuild_hint(store_dir)}")
    return np.load(path, mmap_mode="r", allow_pickle=False)


def read_labels(store_dir: Path, n: int, n_classes: int) -> np.ndarray:
    """``labels.npy`` as ``(n,)`` int64: integers, each -1 (unknown) or a class of ``classes.json``."""
    path = store_dir / "labels.npy"
    shape, _ = check_npy(path, rebuild_hint(store_dir), kinds="iu", ndim=1)
    if shape != (n,):
        raise ArtifactError(f"{path} holds {shape[0]} labels for {n} rows; {rebuild_hint(store_dir)}")
    labels = np.load(path, allow_pickle=False)
    if n:
        low, high = int(labels.min()), int(labels.max())
        if low < -1 or high >= n_classes:
            bad = int(np.argmax(labels < -1)) if low < -1 else int(np.argmax(labels >= n_classes))
            allowed = f"-1 (unknown) or 0..{n_classes - 1}" if n_classes else "-1 (unknown)"
            raise ArtifactError(
                f"{path} holds label {int(labels[bad])} at row {bad}, but {store_dir / 'classes.json'} names "
                f"{n_classes} classes: a label is {allowed}; {rebuild_hint(store_dir)}"
            )
    return labels.astype(np.int64)


def read_strings(store_dir: Path, name: str, allow_int: bool = False) -> list[str]:
    """A JSON list of strings (``ids.json``, ``classes.json``); with ``allow_int``, integers are read as their
    decimal strings (ids of stores written from integer ids)."""
    path = store_dir / name
    items = read_json(path, expect=list, hint=rebuild_hint(store_dir))
    for i, item in enumerate(items):
        if not isinstance(item, str):
            if allow_int and isinstance(item, int) and not isinstance(item, bool):
                continue
            raise ArtifactError(
                f"{path} entry {i} is {item!r}, not a string; {rebuild_hint(store_dir)}"
            )
    return [str(item) for item in items]


def read_split(store_dir: Path, n: int) -> dict[str, np.ndarray]:
    """``split.npz``: members ``train``/``val``/``test``, each a 1-d integer array of rows in ``[0, n)``."""
    path = store_dir / "split.npz"
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            split = {}
            for info in members:
                name = info.filename[: -len(".npy")] if info.filename.endswith(".npy") else info.filename
                if name not in SPLIT_NAMES or name in split:
                    raise ArtifactError(
                        f"{path} holds a member {info.filename!r}; a split has at most one each of "
                        f"{', '.join(SPLIT_NAMES)}; {rebuild_hint(store_dir)}"
                    )
                if info.file_size > 8 * n + _HEADER_BYTES:
                    raise ArtifactError(f"{path}: {name} is {info.file_size} bytes, more than any split of {n} rows "
                                        f"needs; {rebuild_hint(store_dir)}")
                with archive.open(info) as f:
                    split[name] = _read_member(f, info.file_size, f"{path}: {name}", store_dir)
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, *HEADER_ERRORS) as e:
        if isinstance(e, ArtifactError):
            raise
        raise ArtifactError(
            f"{path} is truncated or corrupt ({type(e).__name__}: {e}); {rebuild_hint(store_dir)}"
        ) from e
    for name, rows in split.items():
        if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= n):
            bad = int(rows.min()) if int(rows.min()) < 0 else int(rows.max())
            raise ArtifactError(f"{path}: the {name} split holds row {bad}, outside the store's rows 0..{n - 1}; "
                                f"{rebuild_hint(store_dir)}")
        split[name] = rows.astype(np.int64)
    return split


def _read_member(f, size: int, what: str, store_dir: Path) -> np.ndarray:
    """One ``.npy`` member of ``size`` bytes: a 1-d integer array whose header matches its size."""
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(f)
    if dtype.hasobject or dtype.kind not in "iu" or len(shape) != 1:
        raise ArtifactError(f"{what} holds {dtype} {tuple(shape)} where a 1-d array of integer row indices belongs; "
                            f"{rebuild_hint(store_dir)}")
    n_bytes = math.prod(shape) * dtype.itemsize
    if f.tell() + n_bytes != size:
        raise ArtifactError(f"{what}: its header ({dtype} {tuple(shape)}) needs {f.tell() + n_bytes} bytes but the "
                            f"member holds {size}; {rebuild_hint(store_dir)}")
    data = f.read(n_bytes)
    if len(data) != n_bytes:
        raise ArtifactError(f"{what} is truncated; {rebuild_hint(store_dir)}")
    return np.frombuffer(data, dtype=dtype).copy()
