"""An ImageNet-shaped embedding store for the scale rehearsal (``bench_scale.py``), generated in bounded memory.

Rows stand in for L2-normalised CLIP embeddings of ImageNet: ``n`` unit rows of width 512 in ``n_classes`` classes
(contiguous blocks of rows, as an extraction of class folders gives them), each row

    x = normalise(class_weight · m_c + Σ_j w_j a_j + noise · g / √d)

with ``m_c`` the unit mean of its class, ``a_j`` unit concept atoms of a shared dictionary, ``g`` standard normal.
Each class owns a pool of ``pool_size`` concepts (drawn from the dictionary, so classes share some); a row uses
``concepts_per_row`` of its class's pool with exponential weights and ``private_per_row`` concepts from the whole
dictionary with uniform weights. Neighbours therefore share concepts (those of their class's pool), and a global
linear head is well above chance but not perfect (rows of a class vary in which concepts they use, classes
overlap in concepts, private concepts and noise blur them): with 400 rows per class, a linear head trained for two
epochs reaches 84% and a 50-neighbour majority vote 59%. About 30% of a row's variance is isotropic noise, which
no dictionary explains: an SAE's FVU cannot go far below that.

The split is the paper's: ``test_per_class`` rows of each class held out as test (seeded), the rest train.
Rows are generated in fixed blocks of ``BLOCK_ROWS``, each from ``numpy.random.default_rng([seed, block])``, so
the data is a function of the seed alone and at most one block is in memory; the block is written through the
store's own streaming writer (``artifacts.write_npy_rows``, then ``embeddings.store.finish_store``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

BLOCK_ROWS = 32768
"""Rows generated (and written) at a time: bounds the generator's memory to a few (32768, 512) float32 arrays."""
PAPER_ROWS = 1_281_167
"""ImageNet-1k's training images: the paper's store (1,231,167 train + 50,000 test)."""


@dataclass(frozen=True)
class ScaleData:
    """Shape and law of the generated store."""

    n: int = PAPER_ROWS
    """Rows."""
    d: int = 512
    """Width (CLIP ViT-B/16's projection)."""
    n_classes: int = 1000
    """Classes (ImageNet-1k)."""
    test_per_class: int = 50
    """Rows of each class held out as test (the paper's 50), at most a quarter of the class."""
    n_concepts: int = 4096
    """Atoms of the concept dictionary."""
    pool_size: int = 16
    """Concepts owned by each class."""
    concepts_per_row: int = 4
    """Concepts a row draws from its class's pool."""
    private_per_row: int = 4
    """Concepts a row draws from the whole dictionary."""
    class_weight: float = 0.25
    """Weight of the class mean."""
    private_weight: float = 1.2
    """Scale of the private concepts' (uniform) weights."""
    noise: float = 2.0
    """Norm of the isotropic noise before normalisation."""
    dtype: str = "float32"
    """Stored dtype: float32 or float16."""
    seed: int = 0
    """Seed of everything."""

    def __post_init__(self):
        if self.n < 2 * self.n_classes:
            raise ValueError(f"--rows {self.n} must be at least twice the {self.n_classes} classes")
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"--dtype must be float32 or float16, got {self.dtype!r}")
        if self.concepts_per_row > self.pool_size:
            raise ValueError("concepts_per_row must be at most pool_size")

    def to_dict(self) -> dict:
        return asdict(self)


def class_of_rows(spec: ScaleData, start: int, stop: int) -> np.ndarray:
    """Labels of rows ``start:stop``: contiguous classes of sizes differing by at most one row."""
    return (np.arange(start, stop, dtype=np.int64) * spec.n_classes) // spec.n


def test_rows(spec: ScaleData) -> np.ndarray:
    """The test split: ``test_per_class`` seeded rows of each class (at most a quarter of it), ascending."""
    labels = class_of_rows(spec, 0, spec.n)
    sizes = np.bincount(labels, minlength=spec.n_classes)
    per_class = max(1, min(spec.test_per_class, int(sizes.min()) // 4))
    key = np.random.default_rng([spec.seed, 1 << 30]).random(spec.n)
    order = np.lexsort((key, labels))  # by class, random within the class
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.empty(spec.n, dtype=np.int64)
    rank[order] = np.arange(spec.n) - np.repeat(first, sizes)
    return np.flatnonzero(rank < per_class)


class Generator:
    """The dictionary, class means and class pools (seeded once), and the rows of any block."""

    def __init__(self, spec: ScaleData):
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 0])
        self.means = _unit(rng.normal(size=(spec.n_classes, spec.d)).astype(np.float32))
        self.atoms = _unit(rng.normal(size=(spec.n_concepts, spec.d)).astype(np.float32))
        self.pools = np.stack([rng.choice(spec.n_concepts, spec.pool_size, replace=False)
                               for _ in range(spec.n_classes)])

    @property
    def n_blocks(self) -> int:
        return -(-self.spec.n // BLOCK_ROWS)

    def block(self, i: int) -> np.ndarray:
        """Rows ``[i·BLOCK_ROWS, (i+1)·BLOCK_ROWS)`` as unit rows ``(m, d)`` in the stored dtype."""
        import scipy.sparse as sp

        s = self.spec
        start, stop = i * BLOCK_ROWS, min((i + 1) * BLOCK_ROWS, s.n)
        m = stop - start
        rng = np.random.default_rng([s.seed, 1, i])
        labels = class_of_rows(s, start, stop)
        own = np.argsort(rng.random((m, s.pool_size)), axis=1)[:, :s.concepts_per_row]
        concepts = np.concatenate([np.take_along_axis(self.pools[labels], own, 1),
                                   rng.integers(0, s.n_concepts, (m, s.private_per_row))], axis=1)
        weights = np.concatenate([rng.exponential(1.0, (m, s.concepts_per_row)),
                                  s.private_weight * rng.random((m, s.private_per_row))], axis=1)
        width = concepts.shape[1]
        mix = sp.csr_matrix((weights.ravel().astype(np.float32), concepts.ravel(),
                             np.arange(m + 1) * width), shape=(m, s.n_concepts))
        x = np.asarray(mix @ self.atoms, dtype=np.float32)
        x += s.class_weight * self.means[labels]
        x += (s.noise / np.sqrt(s.d)) * rng.standard_normal((m, s.d), dtype=np.float32)
        x = _unit(x)
        assert np.isfinite(x).all()
        return x.astype(s.dtype, copy=False)

    def blocks(self):
        for i in range(self.n_blocks):
            yield self.block(i)


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def write_scale_store(store_dir: str | Path, spec: ScaleData):
    """Generate the store into ``store_dir`` through the store's streaming writer (atomic: a partial directory
    renamed when complete) and open it."""
    from artifacts import building, write_npy_rows
    from embeddings.store import EmbeddingStore, finish_store

    gen = Generator(spec)
    test = test_rows(spec)
    is_test = np.zeros(spec.n, dtype=bool)
    is_test[test] = True
    labels = class_of_rows(spec, 0, spec.n)
    with building(store_dir, overwrite=True) as work:
        write_npy_rows(work / "embeddings.npy", spec.dtype, (spec.n, spec.d), gen.blocks(),
                       "generating the scale rehearsal's store")
        finish_store(work, labels=labels, ids=[f"class{c:04d}/img{i:07d}.jpg" for i, c in enumerate(labels)],
                     classes=[f"class{c:04d}" for c in range(spec.n_classes)],
                     split={"train": np.flatnonzero(~is_test), "test": test}, skipped=[],
                     config={"generator": "benchmarks/scale_data.py", **spec.to_dict()},
                     meta={"backbone": "synthetic ImageNet-shaped rows (benchmarks/scale_data.py)",
                           "normalisation": "l2"})
    return EmbeddingStore.open(store_dir)
