"""Every reader of an artifact answers a damaged or crafted file with the toolkit's own error naming the file.

A small real run is built once (a store, its codes, an SAE, an IDX data set); each example copies one artifact,
damages one of its files (truncates it, flips a byte, appends bytes, rewrites an array with another dtype or shape,
gives a JSON file or one of its values another type) and opens it with every reader of that artifact. A reader may
accept the file (a flipped byte in a float is still a float); it may never raise anything but ``ArtifactError``,
and its message names the damaged file. ``FUZZ_EXAMPLES=N`` runs N examples instead of the default 150 (a few
seconds); thousands find rarer paths.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from artifacts import ArtifactError
from embeddings.idx import IdxSource, read_idx, write_idx
from embeddings.store import EmbeddingStore, write_store
from embeddings.store_files import rebuild_hint
from analysis.heads import HeadConfig, load_head, save_head, train_head
from analysis.local_ttt import LocalTTT, TTTConfig
from analysis.ttt.chunks import evaluate
from embeddings.cnn import CNNConfig, DigitsCNN, load_cnn, save_cnn
from sae.checkpoint import load_sae, read_latent_frequency, save_sae
from sae.codes import CodeStore, encode_array
from sae.config import SAEConfig
from sae.model import TopKSAE

FILES = {
    "store": ["embeddings.npy", "labels.npy", "ids.json", "classes.json", "split.npz", "skipped.json", "config.json",
              "meta.json"],
    "codes": ["indices.npy", "values.npy", "inv_indptr.npy", "inv_rows.npy", "config.json", "meta.json"],
    "sae": ["sae.safetensors", "config.json", "meta.json", "latent_frequency.npy"],
    "cnn": ["model.safetensors", "config.json", "meta.json"],
    "head": ["head.safetensors", "config.json", "meta.json"],
    "chunks": ["chunk_000000.npz", "chunk_000001.npz", "chunks.json"],
    "idx": ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte"],
}
DAMAGES = ["truncate", "flip", "append", "dtype", "shape", "json_type", "json_value"]
OTHER_JSON = [None, True, 7, -1.5, "text", [], [1, "a"], {}, {"a": None}]


CHUNK_X = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
CHUNK_Y = np.arange(5) % 2


def _chunk_ttt() -> LocalTTT:
    head = train_head(CHUNK_X, CHUNK_Y, HeadConfig(epochs=1, batch_size=5))
    return LocalTTT(head, TTTConfig(n_neighbours=2, steps=1)).fit(CHUNK_X, CHUNK_Y)


def _readers(kind: str, art: Path, name: str):
    """The readers of one artifact, each a function of nothing."""
    if kind == "store":
        return [lambda: EmbeddingStore.open(art), lambda: EmbeddingStore.open(art, verify=True)]
    if kind == "codes":
        return [lambda: CodeStore.open(art)]
    if kind == "sae":
        return [lambda: load_sae(art), lambda: load_sae(art, verify_hash=False), lambda: read_latent_frequency(art)]
    if kind == "cnn":
        return [lambda: load_cnn(art)]
    if kind == "head":
        return [lambda: load_head(art)]
    if kind == "chunks":
        return [lambda: evaluate(_chunk_ttt(), CHUNK_X, chunk_dir=art, chunk_size=3, fingerprint={"run": 1})]
    return [lambda: read_idx(art / name), lambda: IdxSource(art)]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 4)).astype(np.float32)
    write_store(root / "store", x, labels=np.arange(12) % 3, ids=[f"img{i}.png" for i in range(12)],
                classes=["a", "b", "c"], split={"train": np.arange(8), "test": np.arange(8, 12)},
                skipped=[{"id": "bad.png", "reason": "zero bytes"}], config={"source": "x"}, meta={"backbone": "b"})
    torch.manual_seed(0)
    model = TopKSAE(SAEConfig(4, 8, 2))
    save_sae(model, root / "sae", parent_store_hash="0" * 64,
             latent_frequency={"frequency": np.linspace(0, 0.5, 8), "n_rows": 12, "rows": "all"})
    save_cnn(DigitsCNN(CNNConfig(width=1, n_classes=3, image_size=16)), root / "cnn")
    save_head(train_head(x, np.arange(12) % 3, HeadConfig(epochs=1, batch_size=6)), root / "head")
    evaluate(_chunk_ttt(), CHUNK_X, chunk_dir=root / "chunks", chunk_size=3, fingerprint={"run": 1})
    encode_array(model.eval(), x, root / "codes", batch_size=5, parents={"store_dir": "S", "sae_dir": "A"})
    idx = root / "idx"
    idx.mkdir()
    for prefix, n, gz in (("train", 20, ""), ("t10k", 10, ".gz")):
        write_idx(idx / f"{prefix}-images-idx3-ubyte{gz}", rng.integers(0, 256, (n, 6, 6), dtype=np.uint8))
        write_idx(idx / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    return root


def _damage_npy(path: Path, damage: str, data) -> None:
    a = np.load(path, allow_pickle=False)
    if damage == "dtype":
        dtype = data.draw(st.sampled_from([np.int8, np.uint16, np.int32, np.float16, np.float64, np.bool_, "U3"]))
        np.save(path, a.astype(dtype))
    else:
        shapes = [a.reshape(-1), a[None], a[:-1] if a.shape[0] else a, np.concatenate([a, a[:1]])]
        np.save(path, data.draw(st.sampled_from(shapes)))


def _damage_array_file(path: Path, damage: str, data) -> None:
    """Another dtype or shape for a file of arrays: ``.npy``, ``.npz``, ``.safetensors`` or IDX."""
    if path.suffix == ".npy":
        _damage_npy(path, damage, data)
    elif path.suffix == ".npz":
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        key = data.draw(st.sampled_from(sorted(arrays)))
        arrays[key] = arrays[key].astype(np.float64) if damage == "dtype" else arrays[key].reshape(-1, 1)
        np.savez(path, **arrays)
    elif path.suffix == ".safetensors":
        tensors = load_file(str(path))
        key = data.draw(st.sampled_from(sorted(tensors)))
        tensors[key] = tensors[key].double() if damage == "dtype" else tensors[key].reshape(-1, 1).contiguous()
        save_file(tensors, str(path))
    else:  # IDX: the type byte or one size of the header
        raw = bytearray(path.read_bytes() if path.suffix != ".gz" else __import__("gzip").decompress(path.read_bytes()))
        at = 2 if damage == "dtype" else data.draw(st.integers(4, 4 + 4 * raw[3] - 1))
        raw[at] = data.draw(st.integers(0, 255))
        path.write_bytes(__import__("gzip").compress(bytes(raw)) if path.suffix == ".gz" else bytes(raw))


def _damage_json(path: Path, damage: str, data) -> None:
    obj = json.loads(path.read_text())
    other = data.draw(st.sampled_from(OTHER_JSON))
    if damage == "json_type" or not obj:
        obj = other
    elif isinstance(obj, dict):
        obj[data.draw(st.sampled_from(sorted(obj)))] = other
    else:
        obj[data.draw(st.integers(0, len(obj) - 1))] = other
    path.write_text(json.dumps(obj))


def _damage(path: Path, damage: str, data) -> None:
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: data.draw(st.integers(0, max(len(raw) - 1, 0)))])
    elif damage == "flip":
        at = data.draw(st.integers(0, len(raw) - 1))
        path.write_bytes(raw[:at] + bytes([raw[at] ^ data.draw(st.integers(1, 255))]) + raw[at + 1 :])
    elif damage == "append":
        path.write_bytes(raw + data.draw(st.binary(min_size=1, max_size=64)))
    elif damage in ("json_type", "json_value"):
        if path.suffix != ".json":
            return _damage(path, "flip", data)
        _damage_json(path, damage, data)
    elif path.suffix == ".json":
        _damage_json(path, "json_value", data)
    else:
        _damage_array_file(path, damage, data)


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 150)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(FILES)), damage=st.sampled_from(DAMAGES), data=st.data())
def test_every_reader_answers_a_damaged_file_with_the_toolkits_error(pristine, tmp_path_factory, kind, damage, data):
    name = data.draw(st.sampled_from(FILES[kind]))
    art = tmp_path_factory.mktemp("case") / kind
    shutil.copytree(pristine / kind, art)
    _damage(art / name, damage, data)
    for read in _readers(kind, art, name):
        try:
            read()
        except ArtifactError as e:
            said = str(e).replace(rebuild_hint(art), "")  # the fix names the store's config.json: not evidence
            assert str(art / name) in said, f"{damage} of {name}: the error does not name it: {e}"
        except Exception as e:  # anything else is a defect of the reader
            pytest.fail(f"{damage} of {kind}/{name}: {type(e).__name__}: {e}")


def test_the_pristine_run_reads_cleanly(pristine):
    for kind, names in FILES.items():
        for read in _readers(kind, pristine / kind, names[0]):
            read()
