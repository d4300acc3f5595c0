"""Synthetic classification data with and without locally sparse concepts, for TTT tests and benchmarks.

The paper's model (Sec. 2): each input has a sparse concept vector ``Φ(x) ∈ R^{n_concepts}``, the features are
a random projection ``Ψ(x) = A Φ(x) ∈ R^dim`` with ``dim ≪ n_concepts``, and the label is linear in the
concepts. Here an input belongs to a *topic* (a small set of concepts it shares with its neighbours, so that
neighbourhoods are locally sparse) plus a few private noise concepts; its label is
``argmax_c Σ_{j: class(j)=c} Φ_j`` — the class whose concepts are most active. A global linear head on ``Ψ``
suffers the crosstalk of all ``n_concepts`` projected atoms; a local head only has to separate the few atoms
of one topic, and a majority vote cannot follow which of the topic's concepts dominates.
The isotropic twin has labels that are a noisy linear function of Gaussian features: no local structure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.neighbours import SparseCodes


@dataclass(frozen=True)
class SparseTopics:
    """Shape of the locally sparse data set."""

    n: int = 4000
    """Rows."""
    dim: int = 32
    """Feature width ``d2``."""
    n_concepts: int = 256
    """Concepts ``d1``."""
    n_classes: int = 16
    """Classes; each concept belongs to one."""
    n_topics: int = 40
    """Topics; each holds ``topic_size`` concepts shared by its rows."""
    topic_size: int = 4
    """Concepts per topic."""
    n_private: int = 2
    """Private noise concepts per row."""
    private_scale: float = 0.3
    """Magnitude of the private concepts."""
    value_law: str = "uniform"
    """Law of the shared concepts' values: ``uniform`` on [0, 2] or ``exponential`` (scale 1; wider gaps between
    a row's strongest concepts, so that a global head errs less)."""
    unit_norm: bool = True
    """Scale every feature row to unit norm (as CLIP's embeddings)."""
    seed: int = 0
    """Seed of the atoms, topics and rows."""


def sparse_topics(spec: SparseTopics = SparseTopics()) -> tuple[np.ndarray, np.ndarray, SparseCodes]:
    """Features ``(n, dim)`` float32, labels ``(n,)`` int64 and the true concept codes (``SparseCodes``)."""
    rng = np.random.default_rng(spec.seed)
    atoms = rng.normal(size=(spec.n_concepts, spec.dim)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    concept_class = rng.integers(0, spec.n_classes, spec.n_concepts)
    topics = np.stack([rng.choice(spec.n_concepts, spec.topic_size, replace=False) for _ in range(spec.n_topics)])
    topic = rng.integers(0, spec.n_topics, spec.n)
    shared = topics[topic]                                                    # (n, topic_size)
    private = rng.integers(0, spec.n_concepts, (spec.n, spec.n_private))
    ids = np.concatenate([shared, private], axis=1)
    if spec.value_law not in ("uniform", "exponential"):
        raise ValueError(f"value_law must be uniform or exponential, got {spec.value_law!r}")
    strength = rng.uniform(0.0, 2.0, shared.shape) if spec.value_law == "uniform" else rng.exponential(1.0, shared.shape)
    values = np.concatenate([strength,
                             spec.private_scale * rng.uniform(0.0, 1.0, private.shape)], axis=1).astype(np.float32)
    x = np.einsum("nk,nkd->nd", values, atoms[ids])
    class_mass = np.zeros((spec.n, spec.n_classes), dtype=np.float32)
    np.add.at(class_mass, (np.repeat(np.arange(spec.n), ids.shape[1]), concept_class[ids].ravel()), values.ravel())
    labels = class_mass.argmax(1).astype(np.int64)
    if spec.unit_norm:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels, SparseCodes(values, ids, spec.n_concepts)


def isotropic(n: int = 4000, dim: int = 32, n_classes: int = 16, noise: float = 0.5,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian features and labels ``argmax(x W* + noise)``: globally linear, nothing local to exploit."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    w = rng.normal(size=(dim, n_classes)).astype(np.float32) / np.sqrt(dim)
    labels = (x @ w + noise * rng.normal(size=(n, n_classes))).argmax(1).astype(np.int64)
    return x, labels
