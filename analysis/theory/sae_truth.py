"""Ground truth for the SAE: train the toolkit's SAE on the model's features Ψ = AΦ and compare with Φ and A.

Two questions, both answerable only on planted data:
- Does the SAE recover the concepts? For every concept that occurs in the training sample, the best cosine
  between its column of ``A`` and any decoder row (``matched cosine``); the paper's SAE analysis presumes these
  are high. Control: the same statistic for random unit rows.
- Do the concept-sharing statistics of the concept study (``analysis/neighbourhoods.py``: distinct concepts in
  a neighbourhood, mean pairwise Jaccard of supports) computed from the SAE's codes match those computed from
  the true Φ, on the same Ψ-neighbourhoods?
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from analysis.neighbourhoods import neighbourhood_stats
from analysis.neighbours import NeighbourIndex, SparseCodes
from analysis.stats import accuracy, measure, paired_difference
from analysis.theory.model import ConceptModel, ConceptModelConfig
from sae.checkpoint import load_sae
from sae.config import SAEConfig
from sae.train import RunConfig, TrainConfig, train_sae


@dataclass(frozen=True)
class SAECheckConfig:
    """The SAE trained on Ψ for the ground-truth comparison."""

    expansion: float = 2.0
    """Latents per true concept: ``n_latents = expansion · d1`` (--sae-expansion)."""
    n_steps: int = 2000
    """Optimizer steps (--sae-steps)."""
    batch_size: int = 256
    """Batch size (--sae-batch-size)."""
    lr: float = 3e-3
    """Peak Adam learning rate (--sae-lr)."""
    n_neighbours: int = 50
    """Neighbourhood size of the sharing statistics (--n-neighbours)."""
    n_queries: int = 500
    """Test points whose neighbourhoods are compared (--sae-queries)."""
    threshold: float = 0.9
    """Matched cosine above which a concept counts as recovered (the SAE literature's usual 0.9)."""

    def __post_init__(self) -> None:
        if self.expansion <= 0:
            raise ValueError(f"--sae-expansion must be > 0, got {self.expansion}")
        if self.n_steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("--sae-steps, --sae-batch-size and --sae-lr must be positive")
        if self.n_neighbours < 1 or self.n_queries < 1:
            raise ValueError("--n-neighbours and --sae-queries must be >= 1")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"the recovery threshold must be in (0, 1], got {self.threshold}")


def matched_cosines(columns: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each column of ``columns (d, m)``, its best cosine with any row of ``rows (n, d)``."""
    cols = columns / np.linalg.norm(columns, axis=0, keepdims=True)
    r = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    return (r @ cols).max(axis=0)


def train_sae_on_features(x: np.ndarray, out_dir: str | os.PathLike, d1: int, check: SAECheckConfig, seed: int,
                          k: int) -> torch.nn.Module:
    """The toolkit's top-k SAE trained on ``x`` with ``k`` active latents; written to ``out_dir``, loaded back."""
    sae_config = SAEConfig(d_in=x.shape[1], n_latents=max(k, int(round(check.expansion * d1))), k=k)
    n_held = max(1, min(2000, len(x) // 10))
    train_sae(
        x, out_dir, sae_config,
        TrainConfig(n_steps=check.n_steps, batch_size=check.batch_size, lr=check.lr, seed=seed),
        RunConfig(progress=False, checkpoint_every=0, log_every=max(1, check.n_steps // 10)),
        train_rows=np.arange(n_held, len(x)), heldout_rows=np.arange(n_held), overwrite=True,
    )
    return load_sae(out_dir)


@torch.no_grad()
def sae_codes(model, x: np.ndarray, batch: int = 4096) -> SparseCodes:
    """The SAE's codes of ``x`` as ``SparseCodes``."""
    values, indices = [], []
    for start in range(0, len(x), batch):
        v, i = model.encode(torch.from_numpy(np.ascontiguousarray(x[start:start + batch])))
        values.append(v.numpy())
        indices.append(i.numpy())
    return SparseCodes(np.concatenate(values), np.concatenate(indices), model.config.n_latents)


def sae_ground_truth(config: ConceptModelConfig, check: SAECheckConfig, work_dir: str | os.PathLike) -> dict:
    """Train the SAE on one draw's training features and compare it with the planted concepts (module doc)."""
    model = ConceptModel(config)
    train, test = model.train_test()
    sae = train_sae_on_features(train.x, Path(work_dir) / "sae", config.d1, check, config.seed, config.s)
    decoder = sae.W_dec.detach().numpy()
    present = np.unique(train.concepts.indices)
    best = matched_cosines(model.A[:, present], decoder)
    rng = np.random.default_rng(config.seed)
    control = matched_cosines(model.A[:, present], rng.normal(size=decoder.shape))
    queries = test.x[: check.n_queries]
    nb = NeighbourIndex("l2").fit(train.x).search(queries, check.n_neighbours)[1]
    true_stats = neighbourhood_stats(train.concepts, nb)
    learned_stats = neighbourhood_stats(sae_codes(sae, train.x), nb)
    out = {
        "recovered_fraction": accuracy(best >= check.threshold, "concepts occurring in the training sample"),
        "matched_cosine": measure(best, "best cosine of a decoder row with the concept's column of A"),
        "control_recovered_fraction": accuracy(control >= check.threshold, "random unit rows instead of the decoder"),
        "n_latents": int(decoder.shape[0]),
    }
    for name in ("union", "jaccard"):
        out[f"{name}_true"] = measure(true_stats[name], "true concepts Φ over Ψ-neighbourhoods")
        out[f"{name}_learned"] = measure(learned_stats[name], "SAE codes over the same neighbourhoods")
        out[f"{name}_difference"] = paired_difference(learned_stats[name], true_stats[name])
    return out

