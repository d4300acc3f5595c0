"""Training state on disk: the checkpoint file, RNG states, and the fingerprint that ties a checkpoint to its
data and settings (what ``train_sae`` needs to resume bitwise)."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from artifacts import ArtifactError, atomic_file, check_replaceable, torch_load_refusal

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 2


def rng_state(device: torch.device) -> dict:
    """Torch, numpy and Python RNG states, as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        (npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# --------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` to a temporary sibling, fsync, rename: a crash leaves the previous checkpoint intact."""
    with atomic_file(path) as f:
        torch.save(state, f)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a training checkpoint (tensors and plain values only: ``weights_only=True``); one that cannot be read
    is refused naming it, and torch's advice to load it with ``weights_only=False`` never reaches the user."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle, zip, runtime and value errors for damaged or crafted files
        raise ArtifactError(f"the training checkpoint {path} cannot be resumed: {torch_load_refusal(e)}; run again "
                            "with --overwrite to start the training afresh") from None
    if not isinstance(state, dict):
        raise ArtifactError(f"the training checkpoint {path} holds {type(state).__name__}, not a checkpoint; run "
                            "again with --overwrite to start the training afresh")
    return state


def rows_digest(rows: np.ndarray | None, n: int) -> str:
    if rows is None:
        return f"all:{n}"
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()


def hash_ints(*values: int) -> int:
    """A 63-bit seed derived from integers (stable across processes and Python versions)."""
    digest = hashlib.sha256(",".join(str(int(v)) for v in values).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def check_fingerprint(saved: dict, current: dict, ckpt_path: Path) -> None:
    """Refuse a checkpoint made for other data or other settings, naming what differs."""
    if saved.get("d") != current["d"]:
        raise ArtifactError(
            f"checkpoint {ckpt_path} was trained on d={saved.get('d')} embeddings but the data has "
            f"d={current['d']}; resume with the store it was made from, or pass --overwrite to start over"
        )
    if saved.get("parent_store_hash") != current["parent_store_hash"]:
        raise ArtifactError(
            f"checkpoint {ckpt_path} was made from store {saved.get('parent_store_hash')}, not from this store "
            f"({current['parent_store_hash']}); resume with the original --store, or pass --overwrite to start over"
        )
    diffs = []
    for section in ("sae_config", "train_config"):
        a, b = saved.get(section, {}), current[section]
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.append(f"{key}: checkpoint {a.get(key)!r}, now {b.get(key)!r}")
    for key in ("n_rows", "rows"):
        if saved.get(key) != current[key]:
            diffs.append(f"training rows ({key}): checkpoint {saved.get(key)}, now {current[key]}")
    if diffs:
        raise ArtifactError(
            f"checkpoint {ckpt_path} was made with other settings:\n  "
            + "\n  ".join(diffs)
            + "\nrerun with the flags of the interrupted run, or pass --overwrite to start over"
        )


def check_paths(out_dir: Path, work_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Decide whether to resume; refuse to clobber silently. Returns True when a checkpoint will be loaded."""
    ckpt = work_dir / CHECKPOINT_NAME
    check_replaceable(out_dir, overwrite)  # only an artifact is replaced, and only with overwrite
    if ckpt.exists():
        if resume:
            return True
        if not overwrite:
            raise ArtifactError(
                f"an interrupted run left a checkpoint in {work_dir}; pass --resume to continue it, "
                "or --overwrite to discard it and start over"
            )
    elif work_dir.exists() and not overwrite and not resume:
        raise ArtifactError(
            f"{work_dir} exists (an interrupted run's work directory); pass --resume or --overwrite"
        )
    return False


