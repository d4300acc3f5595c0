"""The concept study: how few concepts neighbourhoods share (the paper's Section 3), with baselines and plots.

``concept_study(store, sae, codes, config, out_dir)`` finds each query's neighbours in the three spaces
(embeddings Ψ, reconstructions Ψ̂, codes Φ̂; neighbours from the train split, queries from the test split, as in
the paper), measures the neighbourhoods' concept statistics (``analysis.neighbourhoods``) against random and
same-label neighbourhoods of the same size, checks O1 (similarity preservation: the concept-space cosines of
query and neighbours when neighbours are chosen in each space), and trains linear probes on raw embeddings,
reconstructions and codes (downstream preservation). Every number is a Measure dict (value, standard error over
queries or test points, n); the plots are PNGs in ``out_dir``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import stats as scipy_stats

from analysis import neighbourhoods as nbh
from analysis.concepts.naming import firing_counts
from analysis.neighbours import NeighbourIndex
from analysis.progress import progress
from analysis.parents import check_codes
from analysis.spaces import SPACE_NAMES, Space, code_space, embedding_space, reconstruction_space
from analysis.stats import accuracy, measure, paired_difference
from embeddings.store import EmbeddingStore
from sae.codes import CodeStore
from sae.model import TopKSAE
from artifacts.typed import check_seed


@dataclass(frozen=True)
class ConceptConfig:
    """Settings of the concept study."""

    n_neighbours: int = 50
    """Neighbourhood size (the paper: 50) (--n-neighbours)."""
    n_queries: int | None = None
    """Queries: a seeded sample of this many test rows; ``None``: the whole test split (--n-queries)."""
    spaces: tuple[str, ...] = SPACE_NAMES
    """Spaces in which neighbours are found (--spaces)."""
    factory: str = "Flat"
    """FAISS index of the dense spaces; the exact ``Flat`` by default (--factory)."""
    probe: bool = True
    """Train the downstream linear probes (--probe/--no-probe)."""
    probe_epochs: int = 50
    """Epochs of each linear probe (the paper's global head: 50, batch 250, Adam lr 1e-3) (--probe-epochs)."""
    probe_lr: float = 1e-3
    """Adam learning rate of the linear probes (the paper's global head: 1e-3) (--probe-lr)."""
    umap: bool = True
    """Draw the UMAP maps of decoder atoms and embeddings (--umap/--no-umap)."""
    umap_max_points: int = 50_000
    """UMAP runs on a seeded sample of at most this many points (--umap-max-points)."""
    n_bootstrap: int = 50
    """Bootstrap resamples over queries for the standard errors of the O1 distances (--n-bootstrap)."""
    seed: int = 0
    """Seed of the query sample, the baselines, the probes and the UMAP sample (--seed)."""
    device: str = "cpu"
    """Torch device of the linear probes (a run setting, not a statistic's) (--device)."""

    def __post_init__(self):
        check_seed(self.seed)
        if self.n_neighbours < 1:
            raise ValueError(f"--n-neighbours must be >= 1, got {self.n_neighbours}")
        if self.n_queries is not None and self.n_queries < 2:
            raise ValueError(f"--n-queries must be >= 2 (a standard error needs two), got {self.n_queries}")
        unknown = set(self.spaces) - set(SPACE_NAMES)
        if not self.spaces or unknown:
            raise ValueError(f"--spaces must be a non-empty subset of {SPACE_NAMES}, got {list(self.spaces)}")
        if not self.probe_lr > 0:
            raise ValueError(f"--probe-lr must be > 0, got {self.probe_lr}")
        for flag, value in (("--probe-epochs", self.probe_epochs), ("--umap-max-points", self.umap_max_points),
                            ("--n-bootstrap", self.n_bootstrap)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")


def study_rows(store: EmbeddingStore, config: ConceptConfig) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(queries, pool, exclude_self)``: test rows (or a seeded sample) and train rows; without those splits,
    every row is both, and a query never counts itself as a neighbour."""
    split = store.split
    has_train = bool(len(split.get("train", ())))
    pool = split["train"] if has_train else np.arange(store.n)
    held = next((split[name] for name in ("test", "val") if len(split.get(name, ()))), None)
    exclude_self = held is None or not has_train  # without a train split the pool holds the queries too
    queries = np.arange(store.n) if held is None else held
    if config.n_queries is not None and config.n_queries < queries.size:
        queries = np.sort(np.random.default_rng(config.seed).choice(queries, config.n_queries, replace=False))
    return np.asarray(queries, dtype=np.int64), np.asarray(pool, dtype=np.int64), exclude_self


def find_neighbours(space: Space, pool: np.ndarray, queries: np.ndarray, n_neighbours: int, exclude_self: bool,
                    factory: str = "Flat") -> np.ndarray:
    """``(m, n_neighbours)`` rows of ``pool`` nearest (cosine) to each query in ``space``."""
    exclude = queries if exclude_self else None
    if space.is_sparse:
        index = NeighbourIndex().fit(space.sparse(), rows=pool)
        return index.search(space.queries(queries), n_neighbours, exclude=exclude)[1]
    # Dense: only the pool's vectors are read (reconstructions are computed for those rows alone).
    index = NeighbourIndex(factory=factory).fit(space, rows=pool)
    return index.search(space.rows(queries), n_neighbours, exclude=exclude)[1]


def _live_in(sparse, rows: np.ndarray) -> int:
    """Latents that fire on at least one of ``rows``: no neighbourhood drawn from them can use more."""
    values, indices = np.asarray(sparse.values)[rows], np.asarray(sparse.indices)[rows]
    return int(np.unique(indices[values > 0]).size)


def summarise(per_query: dict, provenance: str) -> dict:
    """Measure dicts of the per-neighbourhood statistics."""
    return {name: measure(values, provenance) for name, values in per_query.items()
            if name in nbh.STAT_NAMES}


def o1_comparison(cosines: dict[str, np.ndarray], neighbours: dict[str, np.ndarray], n_bootstrap: int,
                  seed: int) -> dict:
    """O1: mean concept cosine per space; Wasserstein and Kolmogorov–Smirnov distances between the spaces'
    cosine distributions (standard error by bootstrap over queries); neighbour-set overlap between spaces."""
    names = list(cosines)
    out = {"concept_cosine": {s: measure(cosines[s].mean(1), "mean over each query's neighbours") for s in names},
           "wasserstein": {}, "ks": {}, "overlap": {}, "cosine_difference": {}}
    rng = np.random.default_rng(seed)
    m = next(iter(cosines.values())).shape[0]
    resamples = [rng.integers(0, m, m) for _ in range(n_bootstrap)]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pair = f"{a}|{b}"
            for key, fn in (("wasserstein", scipy_stats.wasserstein_distance),
                            ("ks", lambda u, v: scipy_stats.ks_2samp(u, v).statistic)):
                value = float(fn(cosines[a].ravel(), cosines[b].ravel()))
                boot = [fn(cosines[a][r].ravel(), cosines[b][r].ravel()) for r in resamples]
                out[key][pair] = {"value": value, "se": float(np.std(boot, ddof=1)) if n_bootstrap > 1 else None,
                                  "n": int(m), "provenance": f"bootstrap over queries, {n_bootstrap} resamples"}
            out["overlap"][pair] = measure(nbh.neighbour_overlap(neighbours[a], neighbours[b]),
                                           "fraction of neighbours found in both spaces")
            out["cosine_difference"][pair] = paired_difference(cosines[a].mean(1), cosines[b].mean(1))
    return out


def downstream_probes(store: EmbeddingStore, sae: TopKSAE, codes: CodeStore, pool: np.ndarray, test: np.ndarray,
                      config: ConceptConfig) -> dict:
    """Test accuracy of a linear probe on raw embeddings, reconstructions and codes (the paper: codes and
    reconstructions lose a few points against raw CLIP), with the paired differences."""
    from analysis.heads import HeadConfig, predict_head, train_head

    y_train, y_test = store.labels[pool], store.labels[test]
    if (y_train < 0).any() or (y_test < 0).any():
        return {"skipped": "the store is unlabelled (or partly): no downstream probe"}
    head_config = HeadConfig(kind="linear", epochs=config.probe_epochs, lr=config.probe_lr, seed=config.seed)
    n_classes = max(len(store.classes), int(store.labels.max()) + 1)
    spaces = {"raw": embedding_space(store), "recon": reconstruction_space(store, sae), "codes": code_space(codes)}
    correct = {}
    for name, space in spaces.items():
        head = train_head(space.queries(pool), y_train, head_config, n_outputs=n_classes, device=config.device)
        correct[name] = predict_head(head, space.queries(test)) == y_test
    provenance = f"linear probe, {config.probe_epochs} epochs, lr {config.probe_lr}, train split -> test split"
    return {
        "acc_raw": accuracy(correct["raw"], provenance),
        "acc_recon": accuracy(correct["recon"], provenance),
        "acc_codes": accuracy(correct["codes"], provenance),
        "recon_minus_raw": paired_difference(correct["recon"], correct["raw"]),
        "codes_minus_raw": paired_difference(correct["codes"], correct["raw"]),
    }


def concept_study(store: EmbeddingStore, sae: TopKSAE, codes: CodeStore, config: ConceptConfig | None = None,
                  out_dir: str | os.PathLike | None = None) -> dict:
    """The Section 3 statistics as a JSON-ready dict of Measure dicts, with PNG plots in ``out_dir``.

    Keys: ``sharing.union_concepts_mean`` (neighbours in Ψ), ``sharing.union_concepts_random``,
    ``sharing.union_concepts_same_label``, ``sharing.o1_distance`` (Wasserstein between the concept-cosine
    distributions of neighbours found in Ψ and in Φ̂), ``sharing.spaces``/``random``/``same_label`` (every
    statistic), ``sharing.o1``, ``downstream.acc_raw``/``acc_recon``/``acc_codes``, ``plots`` (name -> path).
    """
    from analysis.concepts import plots as concept_plots
    config = config or ConceptConfig()
    check_codes(store, sae, codes)  # codes of another store would pair rows with other images' concepts
    if codes.n != store.n or codes.n_latents != sae.config.n_latents:
        raise ValueError(f"codes {codes.codes_dir} ({codes.n} rows, {codes.n_latents} latents) do not belong to "
                         f"store {store.store_dir} ({store.n} rows) and this SAE ({sae.config.n_latents} latents); "
                         "encode the store with this SAE (scripts/encode.py)")
    queries, pool, exclude_self = study_rows(store, config)
    k, n_nb = codes.k, config.n_neighbours
    nbh.check_lists_fit(queries.size, n_nb, n_lists=len(config.spaces) + 2)  # every space and both baselines
    spaces = {"embeddings": embedding_space(store), "reconstructions": reconstruction_space(store, sae),
              "codes": code_space(codes)}
    sparse = spaces["codes"].sparse()
    bar = progress("concepts", len(config.spaces) + 4, "steps")
    neighbours = {}
    for name in config.spaces:
        bar.step(f"neighbours in {name}")
        neighbours[name] = find_neighbours(spaces[name], pool, queries, n_nb, exclude_self, config.factory)
    bar.step("sharing statistics and baselines")
    per_space = {name: nbh.neighbourhood_stats(sparse, rows, queries) for name, rows in neighbours.items()}
    baselines = {"random": nbh.random_neighbourhoods(pool, queries, n_nb, config.seed)}
    baseline_queries = {"random": queries}
    labelled = bool((store.labels[queries] >= 0).all() and (store.labels[pool] >= 0).any())
    same_label_note = None
    if labelled:
        # A class with no more than n_neighbours rows in the pool cannot fill a same-label neighbourhood: its
        # queries are left out of this baseline (and counted), rather than stopping the study.
        in_pool = np.bincount(store.labels[pool][store.labels[pool] >= 0], minlength=int(store.labels.max()) + 1)
        fits = in_pool[store.labels[queries]] > n_nb
        labelled = bool(fits.any())
        if not fits.all():
            same_label_note = (f"{int((~fits).sum())} of {queries.size} queries left out: their class has at most "
                               f"{n_nb} rows to draw from")
        if labelled:
            baseline_queries["same_label"] = queries[fits]
            baselines["same_label"] = nbh.same_label_neighbourhoods(pool, store.labels, queries[fits], n_nb,
                                                                    config.seed)
    per_baseline = {name: nbh.neighbourhood_stats(sparse, rows, baseline_queries[name])
                    for name, rows in baselines.items()}
    cosines = {name: nbh.code_cosines(sparse, queries, rows) for name, rows in neighbours.items()}
    cosines.update({name: nbh.code_cosines(sparse, baseline_queries[name], rows) for name, rows in baselines.items()})
    bar.step("O1 similarity preservation")
    o1 = o1_comparison({s: cosines[s] for s in neighbours}, neighbours, config.n_bootstrap, config.seed)
    main_space = "embeddings" if "embeddings" in neighbours else next(iter(neighbours))
    sharing = {
        "n_neighbours": n_nb, "n_queries": int(queries.size), "k": k, "main_space": main_space,
        "union_bounds": {"min": k, "max": n_nb * k, "n_live": _live_in(sparse, pool),
                         "note": "k if every neighbour used the same concepts, n_neighbours*k if all differ, "
                                 "never more than the n_live latents that fire on a training row"},
        "union_concepts_mean": measure(per_space[main_space]["union"], f"neighbours in {main_space}"),
        "union_concepts_random": measure(per_baseline["random"]["union"], "random neighbourhoods"),
        "union_concepts_same_label": (measure(per_baseline["same_label"]["union"], "same-label neighbourhoods")
                                      if labelled else None),
        "spaces": {name: summarise(stats, f"neighbours in {name}") for name, stats in per_space.items()},
        "random": summarise(per_baseline["random"], "random neighbourhoods"),
        "same_label": summarise(per_baseline["same_label"], "same-label neighbourhoods") if labelled else None,
        "o1": o1,
    }
    if same_label_note is not None:
        sharing["same_label_note"] = same_label_note
    pair = "embeddings|codes" if {"embeddings", "codes"} <= set(neighbours) else next(iter(o1["wasserstein"]), None)
    sharing["o1_distance"] = o1["wasserstein"].get(pair) if pair else None
    bar.step("downstream probes")
    result = {"config": asdict(config), "sharing": sharing,
              "downstream": (downstream_probes(store, sae, codes, pool, queries, config) if config.probe
                             else {"skipped": "probes turned off"}),
              "plots": {}}
    if out_dir is not None:
        bar.step("plots")
        unions = {**{f"neighbours in {s}": per_space[s]["union"] for s in per_space},
                  **{f"{b.replace('_', '-')} baseline": per_baseline[b]["union"] for b in per_baseline}}
        frequency = firing_counts(codes) / codes.n
        result["plots"] = concept_plots.draw_all(Path(out_dir), unions, sharing["union_bounds"], cosines, store, sae,
                                                 config, frequency)
        result["umap"] = result["plots"].pop("umap_note", None)
    bar.close()
    return result
