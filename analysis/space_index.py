"""The saved neighbour index of one space of a store: chosen by size, measured against exact, built once.

- **Choice** (``choose_factory``): exact ``Flat`` while one query's scan stays small (``n·d`` at most
  ``exact_max_entries``, 16 MiB of float32) or when ``--exact`` is asked; above it ``IVF{√n},Flat``, whose
  ``nprobe`` is the smallest power of two at which recall@10 and recall@50 against exact reach
  ``recall_target`` on a seeded sample of the store's own rows (each query excluding itself). Code space is
  always exact (inverted lists, ``analysis.code_index``).
- **Quality record** (``quality.json`` in the index directory): the factory, ``nprobe``, the recall at the
  chosen ``nprobe`` with its standard error and the whole recall curve, and the store's own distribution of
  nearest-neighbour similarities on the same sample (exact), against which a query's nearest similarity is
  placed (``nearest_percentile``): an image far from everything in the store stands out there.
- **Cache** (``open_space_index``): one artifact directory per space under a cache root, named by a key of the
  hashes of what it indexes (the store's content hash; the SAE's weights hash for reconstructions and codes;
  the codes' files) and of the settings above, so a stale index is never found; built atomically, loaded
  memory-mapped, its recorded parents checked on load. When the root cannot be written the index is built
  in memory for this process and the record says why.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from analysis.dense_index import exact_search, take
from analysis.neighbours import NeighbourIndex, SparseCodes, recall_at_n
from artifacts import SCHEMA_VERSION, ArtifactError, LockHeld, read_json

EXACT_MAX_ENTRIES = 1 << 22
"""Largest ``n·d`` searched by exact scan when no ``--exact`` is asked (4M floats: 16 MiB per query)."""
RECALL_AT = (10, 50)
"""Neighbourhood sizes at which an approximate index's recall is measured and recorded."""
QUALITY = "quality"


@dataclass(frozen=True)
class IndexSettings:
    """How a space's query index is chosen and measured."""

    exact: bool = False
    """Always search by exact scan, whatever the size (--exact)."""
    recall_target: float = 0.98
    """Recall@10 and @50 against exact that an approximate index must reach on the sample (--recall-target)."""
    n_sample: int = 500
    """Store rows (seeded) on which recall and the nearest-similarity distribution are measured (--n-sample)."""
    exact_max_entries: int = EXACT_MAX_ENTRIES
    """Largest n·d searched exactly without --exact; above it an IVF index is built (--exact-max-entries)."""
    seed: int = 0
    """Seed of the sample and of the IVF training rows (--index-seed)."""

    def __post_init__(self):
        if not 0 < self.recall_target <= 1:
            raise ValueError(f"--recall-target must be in (0, 1], got {self.recall_target}")
        if self.n_sample < 2:
            raise ValueError(f"--n-sample must be >= 2, got {self.n_sample}")
        if self.exact_max_entries < 0:
            raise ValueError(f"--exact-max-entries must be >= 0, got {self.exact_max_entries}")


def n_lists(n: int) -> int:
    """IVF lists for ``n`` rows: √n (FAISS's lower guideline; more lists train slowly on a few cores)."""
    return int(np.clip(round(np.sqrt(n)), 16, 65536))


def choose_factory(n: int, dim: int, settings: IndexSettings) -> str:
    """``"Flat"`` (exact) up to ``settings.exact_max_entries`` entries or with ``--exact``, else IVF."""
    if settings.exact or n * dim <= settings.exact_max_entries or n < 39 * n_lists(n):
        return "Flat"  # (FAISS trains an IVF list on at least 39 rows)
    return f"IVF{n_lists(n)},Flat"


@dataclass
class SpaceIndex:
    """A fitted index of one space with its quality record (``quality``), where it lives and whether it was
    reused from an earlier process."""

    index: NeighbourIndex
    quality: dict
    path: Path | None = None
    reused: bool = False
    note: str | None = None

    @property
    def exact(self) -> bool:
        return bool(self.quality["exact"])

    def search(self, queries, n_neighbours: int, exclude=None) -> tuple[np.ndarray, np.ndarray]:
        """``NeighbourIndex.search``; an IVF query whose probed lists hold too few rows is searched again with
        every list probed (exact) rather than refused."""
        try:
            return self.index.search(queries, n_neighbours, exclude)
        except RuntimeError:
            if self.exact or self.index.sparse_:
                raise
            nprobe = self.index.nprobe
            self.index.set_search_parameters(nprobe=self.index.backend_.n_lists)
            try:
                return self.index.search(queries, n_neighbours, exclude)
            finally:
                self.index.set_search_parameters(nprobe=nprobe)

    def nearest_percentile(self, similarity: float) -> float:
        """The share (%) of the sampled store rows whose nearest other row is at most as similar as this."""
        sample = np.asarray(self.quality["nearest_similarity"]["sorted_sample"])
        return float(100.0 * np.searchsorted(sample, similarity, side="right") / sample.size)

    def describe(self) -> dict:
        """What a query's answer says about the index it was searched with."""
        q = self.quality
        return {"factory": q["factory"], "exact": q["exact"], "nprobe": q["nprobe"],
                "recall": {n: r["value"] for n, r in q["recall"].items()}, "recall_sample": q["n_sample"],
                "path": None if self.path is None else str(self.path), "reused": self.reused, "note": self.note}


def build_space_index(data, settings: IndexSettings = IndexSettings()) -> SpaceIndex:
    """Fit the index ``choose_factory`` picks for ``data`` (dense rows or ``SparseCodes``) and measure it."""
    if isinstance(data, SparseCodes):
        index = NeighbourIndex().fit(data)
    else:
        factory = choose_factory(len(data), int(np.shape(data[np.arange(1)])[1]), settings)
        index = NeighbourIndex(factory=factory).fit(data, seed=settings.seed)
    return SpaceIndex(index, measure_quality(index, data, settings))


def _sample_queries(index: NeighbourIndex, data, settings: IndexSettings):
    n = index.n_
    sample = np.sort(np.random.default_rng(settings.seed).choice(n, min(settings.n_sample, n), replace=False))
    queries = data.take(sample) if index.sparse_ else take(data, sample, 0, sample.size)
    return sample, queries


def measure_quality(index: NeighbourIndex, data, settings: IndexSettings) -> dict:
    """The quality record of ``index`` over ``data``: recall against exact (1 by construction for an exact
    index), the recall curve over ``nprobe`` of an IVF index (leaving the chosen ``nprobe`` set), and the
    sampled rows' nearest-neighbour similarities."""
    if index.n_ < 2:
        raise ValueError(f"a query index needs at least 2 rows, got {index.n_}")
    sample, queries = _sample_queries(index, data, settings)
    at = sorted({min(a, index.n_ - 1) for a in RECALL_AT})
    exact = index.sparse_ or index.factory == "Flat"
    record = {"schema_version": SCHEMA_VERSION, "factory": "inverted lists" if index.sparse_ else index.factory,
              "exact": exact, "nprobe": None, "n_sample": int(sample.size), "settings": asdict(settings),
              "recall_curve": []}
    if exact:
        nearest = index.search(queries, 1, exclude=sample)[0][:, 0]
        record["recall"] = {str(a): {"value": 1.0, "se": 0.0, "n": int(sample.size)} for a in at}
    else:
        exact_scores, exact_rows = exact_search(data, queries, max(at), index.metric, exclude=sample)
        nearest = exact_scores[:, 0]
        record.update(_tune_nprobe(index, queries, sample, exact_rows, at, settings.recall_target))
    record["nearest_similarity"] = {"sorted_sample": np.sort(nearest).astype(float).round(6).tolist(),
                                    "median": float(np.median(nearest)), "p1": float(np.percentile(nearest, 1)),
                                    "p5": float(np.percentile(nearest, 5))}
    return record


def _tune_nprobe(index: NeighbourIndex, queries, sample, exact_rows, at: list[int], target: float) -> dict:
    """The smallest power-of-two ``nprobe`` whose recall at every ``at`` reaches ``target`` (every list at most)."""
    top = index.backend_.n_lists
    curve, chosen = [], None
    for nprobe in sorted({min(2**i, top) for i in range(int(np.ceil(np.log2(top))) + 1)}):
        index.set_search_parameters(nprobe=nprobe)
        try:
            found = index.search(queries, max(at), exclude=sample)[1]
        except RuntimeError:  # the probed lists hold fewer rows than asked for
            curve.append({"nprobe": nprobe, "recall": None})
            continue
        recall = {str(a): recall_at_n(found[:, :a], exact_rows[:, :a]) for a in at}
        curve.append({"nprobe": nprobe, "recall": {a: r["value"] for a, r in recall.items()}})
        chosen = (nprobe, recall)
        if all(r["value"] >= target for r in recall.values()):
            break
    index.set_search_parameters(nprobe=chosen[0])
    return {"nprobe": chosen[0], "recall": chosen[1], "recall_curve": curve}


def index_key(space: str, parents: dict, settings: IndexSettings) -> str:
    """The name of a space's index directory: the space and a digest of its parents and settings."""
    blob = json.dumps({"space": space, "parents": parents, "settings": asdict(settings),
                       "schema_version": SCHEMA_VERSION}, sort_keys=True)
    return f"{space}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def open_space_index(root: Path | None, space: str, parents: dict, data: Callable[[], object],
                     settings: IndexSettings = IndexSettings()) -> SpaceIndex:
    """The index of ``space`` saved under ``root`` for these ``parents`` and settings, or one built from
    ``data()`` and saved there (``root=None``: built in memory, not saved)."""
    path = None if root is None else Path(root) / index_key(space, parents, settings)
    if path is not None and path.is_dir():
        return _load(path, parents)
    built = build_space_index(data(), settings)
    if path is None:
        built.note = "built in memory for this process (no index directory)"
        return built
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        built.index.save(path, parents=parents, records={QUALITY: built.quality})
        built.path = path
    except LockHeld:
        built.note = f"another process is saving {path}; built in memory for this process"
    except (OSError, ArtifactError) as e:
        built.note = f"could not save the index at {path} ({getattr(e, 'strerror', None) or e}); built in memory"
    return built


def _load(path: Path, parents: dict) -> SpaceIndex:
    try:
        index = NeighbourIndex.load(path, mmap=True, parents=parents)
        quality = read_json(path / f"{QUALITY}.json", expect=dict)
    except ArtifactError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise ArtifactError(f"the saved neighbour index {path} cannot be read ({e}); delete {path} and it is "
                            "rebuilt on the next query") from e
    if quality.get("factory") is None or "nearest_similarity" not in quality:
        raise ArtifactError(f"{path / (QUALITY + '.json')} is not a quality record; delete {path} and it is "
                            "rebuilt on the next query")
    return SpaceIndex(index, quality, path, reused=True)
