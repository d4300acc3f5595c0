"""The linear-representation model of the paper's Section 2, as a seeded generator with exact moments.

Each input has an ``s``-sparse concept vector ``Φ(x) ∈ R^d1``; its features are ``Ψ(x) = A Φ(x) ∈ R^d2`` for a
random projection ``A``; the target is linear in concepts, ``y = <Φ(x), w*> + σ ε`` (regression) or the argmax
of ``n_classes`` such scores (classification). ``w*`` is scaled so that ``Var <Φ, w*> = 1`` exactly, the unit
target variance under which the paper states the global error ``1 - d2/d1``.

Two kinds of concept supports:
- ``local_sparsity=True``: ``n_clusters`` semantic clusters, each with its own pool of ``cluster_pool``
  concepts and a centre ``μ_c`` on it; a point of cluster ``c`` activates ``s`` concepts of the pool with values
  ``μ_c + spread·u`` (``u`` of unit variance, bounded so that values stay positive). Neighbours in Ψ then share
  their concepts (the paper's local sparsity).
- ``local_sparsity=False``: isotropic supports, ``s`` concepts drawn uniformly from all ``d1`` with values of
  the same mean and variance; a neighbourhood shares nothing in particular.

Concept values are positive (as an SAE's ReLU codes are), so the SAE ground-truth comparison is well posed.
Both cases are one mixture (the isotropic one is a single "cluster" whose pool is every concept), whose
covariance ``Σ = Cov Φ`` is known in closed form: ``global_population_error`` is the exact error of the best
linear predictor on Ψ, against which a fitted global head is checked.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from analysis.neighbours import SparseCodes

PROJECTIONS = ("gaussian", "rademacher")
TASKS = ("regression", "classification")
# Concept values μ ~ U(MU_LOW, MU_HIGH); within-cluster deviations spread·u, u ~ U(-√3, √3) (unit variance).
MU_LOW, MU_HIGH = 1.0, 2.0
U_HALF_WIDTH = math.sqrt(3.0)


@dataclass(frozen=True)
class ConceptModelConfig:
    """One draw of the linear-representation model: sizes, support structure, noise, seed."""

    d1: int = 512
    """Number of concepts (``--d1``)."""
    s: int = 8
    """Active concepts per input (``--s``)."""
    d2: int = 64
    """Feature width: Ψ = AΦ ∈ R^d2 (``--d2``)."""
    local_sparsity: bool = True
    """Clustered supports (neighbours share concepts) or isotropic supports (``--isotropic`` turns it off)."""
    n_clusters: int = 200
    """Semantic clusters (``--n-clusters``); ignored when isotropic."""
    cluster_pool: int | None = None
    """Concepts available to one cluster (``--cluster-pool``); ``None`` means ``s`` (a cluster's points share
    all their concepts)."""
    spread: float = 0.4
    """Within-cluster standard deviation of each active concept's value (``--spread``); at most 1/√3 so that
    values stay positive."""
    noise: float = 0.3
    """Target noise σ (``--noise``)."""
    n_train: int = 20000
    """Training inputs (``--n-train``)."""
    n_test: int = 400
    """Test inputs (``--n-test``)."""
    task: str = "regression"
    """``regression`` (y = <Φ, w*> + σε) or ``classification`` (argmax over ``n_classes`` noisy scores)."""
    n_classes: int = 10
    """Classes of the classification task (``--n-classes``)."""
    projection: str = "gaussian"
    """``gaussian`` (entries N(0, 1/d2)) or ``rademacher`` (±1/√d2) projection A (``--projection``)."""
    seed: int = 0
    """Seed of A, w*, the clusters and every sample."""

    def __post_init__(self) -> None:
        if self.d1 < 1 or self.d2 < 1:
            raise ValueError(f"--d1 and --d2 must be >= 1, got {self.d1} and {self.d2}")
        if not 1 <= self.s <= self.d1:
            raise ValueError(f"--s must be in [1, --d1={self.d1}], got {self.s}")
        if self.n_clusters < 1:
            raise ValueError(f"--n-clusters must be >= 1, got {self.n_clusters}")
        if self.cluster_pool is not None and not self.s <= self.cluster_pool <= self.d1:
            raise ValueError(f"--cluster-pool must be in [--s={self.s}, --d1={self.d1}], got {self.cluster_pool}")
        if not 0.0 <= self.spread <= 1.0 / U_HALF_WIDTH:
            raise ValueError(f"--spread must be in [0, {1 / U_HALF_WIDTH:.4f}] (values stay positive), "
                             f"got {self.spread}")
        if self.noise < 0:
            raise ValueError(f"--noise must be >= 0, got {self.noise}")
        if self.n_train < 2 or self.n_test < 1:
            raise ValueError(f"--n-train must be >= 2 and --n-test >= 1, got {self.n_train} and {self.n_test}")
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {TASKS}, got {self.task!r}")
        if self.n_classes < 2:
            raise ValueError(f"--n-classes must be >= 2, got {self.n_classes}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"--projection must be one of {PROJECTIONS}, got {self.projection!r}")

    @property
    def pool(self) -> int:
        """Concepts one cluster draws from (every concept when isotropic)."""
        if not self.local_sparsity:
            return self.d1
        return self.s if self.cluster_pool is None else self.cluster_pool

    def replace(self, **changes) -> "ConceptModelConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ConceptData:
    """A sample of the model: features Ψ, targets, noiseless scores and the true concepts Φ."""

    x: np.ndarray
    """Features Ψ = AΦ ``(n, d2)`` float32."""
    y: np.ndarray
    """Targets: noisy values ``(n,)`` float32 (regression) or class ids ``(n,)`` int64."""
    f: np.ndarray
    """Noiseless scores <Φ, w*> ``(n,)`` (regression) or ``(n, n_classes)`` (classification), float64."""
    concepts: SparseCodes
    """True concepts Φ: ``s`` (index, value) pairs per row over ``d1`` concepts, sorted by value."""
    cluster: np.ndarray
    """Cluster of each row ``(n,)`` (all 0 when isotropic)."""


class ConceptModel:
    """A drawn model: projection ``A (d2, d1)``, weights ``w* (d1, n_outputs)``, cluster pools and centres."""

    def __init__(self, config: ConceptModelConfig):
        self.config = config
        rng = np.random.default_rng([config.seed, 0])
        c = config
        if c.projection == "gaussian":
            self.A = rng.normal(0.0, 1.0 / math.sqrt(c.d2), size=(c.d2, c.d1))
        else:
            self.A = rng.choice([-1.0, 1.0], size=(c.d2, c.d1)) / math.sqrt(c.d2)
        n_clusters = c.n_clusters if c.local_sparsity else 1
        self.pools = np.stack([rng.choice(c.d1, c.pool, replace=False) for _ in range(n_clusters)])
        if c.local_sparsity:
            self.centres = rng.uniform(MU_LOW, MU_HIGH, size=self.pools.shape)
            self.value_sd = c.spread
        else:
            # One pool of every concept, with the clustered case's marginal value mean and variance.
            self.centres = np.full(self.pools.shape, (MU_LOW + MU_HIGH) / 2)
            self.value_sd = math.sqrt((MU_HIGH - MU_LOW) ** 2 / 12 + c.spread ** 2)
        n_outputs = 1 if c.task == "regression" else c.n_classes
        w = rng.normal(size=(c.d1, n_outputs))
        self.sigma = concept_covariance(self.pools, self.centres, self.value_sd, c.s, c.d1)
        # Unit target variance, Var <Φ, w*> = w*ᵀ Σ w* = 1, per output (the paper's normalisation).
        self.w = w / np.sqrt(np.einsum("io,ij,jo->o", w, self.sigma, w))

    def sample(self, n: int, stream: int) -> ConceptData:
        """``n`` inputs from an independent random stream (0: train, 1: test, ...)."""
        c = self.config
        rng = np.random.default_rng([c.seed, 1, stream])
        cluster = rng.integers(len(self.pools), size=n)
        # s of the pool's concepts per row: the first s of a random permutation of pool positions.
        pick = np.argsort(rng.random((n, c.pool)), axis=1)[:, : c.s]
        indices = np.take_along_axis(self.pools[cluster], pick, 1)
        centre = np.take_along_axis(self.centres[cluster], pick, 1)
        values = centre + self.value_sd * rng.uniform(-U_HALF_WIDTH, U_HALF_WIDTH, size=(n, c.s))
        order = np.argsort(-values, axis=1)
        values, indices = np.take_along_axis(values, order, 1), np.take_along_axis(indices, order, 1)
        x = np.einsum("nk,dnk->nd", values, self.A[:, indices]).astype(np.float32)
        f = np.einsum("nk,nko->no", values, self.w[indices])
        if c.task == "regression":
            f = f[:, 0]
            y = (f + c.noise * rng.normal(size=n)).astype(np.float32)
        else:
            y = np.argmax(f + c.noise * rng.normal(size=f.shape), axis=1).astype(np.int64)
        concepts = SparseCodes(values.astype(np.float32), indices.astype(np.int64), c.d1)
        return ConceptData(x=x, y=y, f=f, concepts=concepts, cluster=cluster)

    def train_test(self) -> tuple[ConceptData, ConceptData]:
        """The configured training and test samples (independent streams)."""
        return self.sample(self.config.n_train, 0), self.sample(self.config.n_test, 1)

    def global_population_error(self) -> float:
        """Exact error of the best linear predictor of <Φ, w*> on Ψ (with intercept), first output:
        ``wᵀΣw − wᵀΣAᵀ(AΣAᵀ)⁺AΣw``. Its mean over random A, w* with isotropic Σ is ``1 − d2/d1``."""
        w = self.w[:, 0]
        sa = self.sigma @ self.A.T
        cross = w @ sa
        gram = self.A @ sa
        return float(w @ self.sigma @ w - cross @ np.linalg.pinv(gram, hermitian=True) @ cross)


def concept_covariance(pools: np.ndarray, centres: np.ndarray, value_sd: float, s: int, d1: int) -> np.ndarray:
    """Exact ``Cov Φ (d1, d1)`` of the mixture: clusters equally likely, ``s`` of a pool of ``p`` active
    uniformly, values ``μ + value_sd·u`` independent with unit-variance ``u``."""
    n_clusters, p = pools.shape
    on = s / p                                              # P(concept j of the pool is active)
    both = s * (s - 1) / (p * (p - 1)) if p > 1 else 0.0   # P(two given pool concepts are both active)
    second = np.zeros((d1, d1))
    mean = np.zeros(d1)
    for pool, mu in zip(pools, centres):
        block = both * np.outer(mu, mu)
        block[np.diag_indices(p)] = on * (mu ** 2 + value_sd ** 2)
        second[np.ix_(pool, pool)] += block
        mean[pool] += on * mu
    second /= n_clusters
    mean /= n_clusters
    return second - np.outer(mean, mean)


def global_error_claim(d1: int, d2: int) -> float:
    """The paper's global error of a linear head on Ψ for unit target variance: ``1 − d2/d1`` (0 if d2 ≥ d1)."""
    return max(0.0, 1.0 - d2 / d1)


def global_error_sd(d1: int, d2: int) -> float:
    """Standard deviation over random ``w*`` of the isotropic population error ``1 − |P_A w*|²/|w*|²``: the
    fraction of a uniformly random direction's squared norm in a ``d2``-subspace is Beta(d2/2, (d1−d2)/2)."""
    if d2 >= d1:
        return 0.0
    a, b = d2 / 2, (d1 - d2) / 2
    return math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
