"""Tiny synthetic data with planted concepts for the concept-analysis tests: codes, a store, an SAE, its codes.

Each class owns a few concepts; a point uses ``k`` of its class's concepts with positive weights, and its
embedding is the weighted sum of those concepts' atoms plus a little noise. The SAE's decoder is the atoms and its
encoder their transpose, so that it finds (mostly) the planted concepts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from analysis.neighbours import SparseCodes
from analysis.run.store_stages import encode_store
from embeddings.store import write_store
from sae.checkpoint import save_sae
from sae.config import SAEConfig
from sae.model import TopKSAE


def planted_codes(n_per_class: int = 40, n_classes: int = 4, per_class: int = 6, k: int = 3, seed: int = 0,
                  isotropic: bool = False) -> tuple[SparseCodes, np.ndarray]:
    """``(codes, labels)``: each point uses k of its class's ``per_class`` concepts (or of all, ``isotropic``)."""
    rng = np.random.default_rng(seed)
    n_latents = n_classes * per_class
    labels = np.repeat(np.arange(n_classes), n_per_class)
    indices = np.empty((labels.size, k), dtype=np.int64)
    for i, label in enumerate(labels):
        pool = np.arange(n_latents) if isotropic else label * per_class + np.arange(per_class)
        indices[i] = rng.choice(pool, k, replace=False)
    values = -np.sort(-rng.uniform(0.5, 2.0, (labels.size, k)), axis=1).astype(np.float32)
    return SparseCodes(values, indices, n_latents), labels


def random_codes(rng: np.random.Generator, n: int, n_latents: int, k: int,
                 p_zero: float | None = None) -> SparseCodes:
    """Random top-k codes: ``k`` distinct latents per row, values in (0, 1) sorted descending; with ``p_zero``
    the last value of each row is 0 with that probability (a top-k latent chosen with value 0 is not active)."""
    indices = np.stack([rng.choice(n_latents, k, replace=False) for _ in range(n)])
    values = -np.sort(-rng.random((n, k)).astype(np.float32), axis=1)
    if p_zero is not None:
        values[:, -1][rng.random(n) < p_zero] = 0.0
    return SparseCodes(values, indices, n_latents)


def planted_embeddings(codes: SparseCodes, d: int = 16, noise: float = 0.02, seed: int = 0):
    """``(x, atoms)``: x = codes · atoms + noise, atoms unit rows ``(n_latents, d)``."""
    rng = np.random.default_rng(seed + 1)
    atoms = rng.normal(size=(codes.n_latents, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    x = codes.dense() @ atoms + noise * rng.normal(size=(codes.n, d))
    return x.astype(np.float32), atoms.astype(np.float32)


def planted_artifacts(tmp: Path, *, labelled: bool = True, source: dict | None = None, seed: int = 0):
    """A store (train/test split), an SAE directory and a codes directory of planted data under ``tmp``."""
    codes, labels = planted_codes(seed=seed)
    x, atoms = planted_embeddings(codes, seed=seed)
    rng = np.random.default_rng(seed)
    test = np.sort(rng.choice(codes.n, codes.n // 4, replace=False))
    split = {"train": np.setdiff1d(np.arange(codes.n), test), "test": test}
    classes = ["cat", "dog", "ship", "tree"]
    digits = (source or {}).get("kind") == "digits"  # digits stores name rows by their dataset index
    ids = [str(i) if digits else f"img{i:03d}" for i in range(codes.n)]
    store = write_store(tmp / "store", x, labels=labels if labelled else None, ids=ids,
                        classes=classes if labelled else [], split=split,
                        meta={"source": source} if source is not None else {})
    model = TopKSAE(SAEConfig(d_in=x.shape[1], n_latents=codes.n_latents, k=3))
    with torch.no_grad():
        model.W_dec.copy_(torch.from_numpy(atoms))
        model.W_enc.copy_(torch.from_numpy(atoms.T.copy()))
        model.b_enc.zero_()
        model.b_dec.zero_()
    save_sae(model, tmp / "sae", parent_store_hash=store.content_hash)
    encode_store(tmp / "store", tmp / "sae", tmp / "codes")
    return tmp / "store", tmp / "sae", tmp / "codes"
