"""Concept statistics of neighbourhoods (the paper's Section 3, O1 and O2) and their baseline neighbourhoods.

For query rows and their ``n_neighbours`` nearest rows (found in embeddings Ψ, reconstructions Ψ̂ or codes Φ̂),
per neighbourhood (the neighbours only, not the query):

- ``union``: distinct active concepts (value > 0) over the neighbours' supports, between ``k`` (all share)
  and ``n_neighbours·k`` (disjoint); the paper finds about 180 of at most 800 for CLIP on ImageNet (O2);
- ``mass50`` / ``mass90``: how many concepts carry 50% / 90% of the neighbourhood's summed activation;
- ``jaccard``: mean pairwise Jaccard index of the neighbours' supports;
- ``query_shared``: for each of the query's concepts the fraction of neighbours that use it, averaged.

Baselines: random neighbourhoods of the same size from the same rows, and same-label neighbourhoods (random
members of the query's class), so that a reader sees how much of the sharing is semantic rather than chance.
O1 (similarity preservation): concept-space cosine between a query and its neighbours when these are chosen
in each space. Everything here is vectorised over queries; ``neighbourhood_stats_reference`` is the plain
per-query twin the tests compare against.
"""

from __future__ import annotations

import numpy as np

from analysis.neighbours import SparseCodes

STAT_NAMES = ("union", "mass50", "mass90", "jaccard", "query_shared")


def _gather(codes: SparseCodes, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(values, indices)`` of ``rows (m, N)`` as ``(m, N, k)`` arrays, read in sorted row order."""
    flat = rows.ravel()
    order = np.argsort(flat, kind="stable")
    values = np.empty((flat.size, codes.values.shape[1]), dtype=np.float32)
    indices = np.empty((flat.size, codes.values.shape[1]), dtype=np.int64)
    values[order] = codes.values[flat[order]]
    indices[order] = codes.indices[flat[order]]
    return values.reshape(*rows.shape, -1), indices.reshape(*rows.shape, -1)


def neighbourhood_stats(codes: SparseCodes, neighbours: np.ndarray, queries: np.ndarray | None = None) -> dict:
    """Per-neighbourhood statistics (module docstring) as ``(m,)`` arrays; with ``queries`` (``(m,)`` rows) also
    ``query_shared (m,)`` and ``query_fraction (m, k)`` (NaN where the query's concept is inactive)."""
    neighbours = np.asarray(neighbours, dtype=np.int64)
    m, n_nb = neighbours.shape
    values, indices = _gather(codes, neighbours)
    k = values.shape[2]
    width = n_nb * k
    sentinel = codes.n_latents
    active = (values > 0).reshape(m, width)
    lat = np.where(active, indices.reshape(m, width), sentinel)
    # One sort of packed keys (latent, entry position) instead of an argsort and two gathers: the position
    # (neighbour * k + slot) comes back from the key, and with it the value and the neighbour.
    # int32 keys sort faster; wide SAEs with large neighbourhoods need int64 so that the keys never wrap.
    key_type = np.int32 if (sentinel + 1) * width <= np.iinfo(np.int32).max else np.int64
    key = np.sort((lat * width).astype(key_type) + np.arange(width, dtype=key_type), axis=1)
    lat, pos = key // width, key % width
    mass = np.take_along_axis(np.where(active, values.reshape(m, width), 0.0), pos, 1)
    is_active = lat < sentinel
    starts = np.ones_like(lat, dtype=bool)
    starts[:, 1:] = lat[:, 1:] != lat[:, :-1]
    # Group = one distinct latent of one neighbourhood; its rank within the neighbourhood is its column below.
    group = (np.cumsum(starts.ravel()) - 1).reshape(m, width)
    col = group - group[:, :1]
    out = {"union": (starts & is_active).sum(1).astype(np.float64)}
    n_cols = int(col.max()) + 1
    flat_cell = (np.arange(m, dtype=np.int64)[:, None] * n_cols + col).ravel()
    grid = np.bincount(flat_cell, weights=mass.ravel(), minlength=m * n_cols).reshape(m, n_cols)
    out.update(_mass_counts(grid))
    sizes = active.reshape(m, n_nb, k).sum(2)
    out["jaccard"] = _mean_jaccard(lat, is_active, pos // k, sizes)
    if queries is not None:
        out.update(_query_shared(codes, np.asarray(queries, dtype=np.int64), lat, n_nb))
    return out


UNION_CHUNK_ENTRIES = 8_000_000
"""Code entries (neighbourhoods × neighbours × k) one step of ``union_sizes`` gathers: bounds its memory when the
neighbourhoods are large (a query tool asked for neighbourhoods near the store's size)."""


def union_sizes(codes: SparseCodes, neighbours: np.ndarray) -> np.ndarray:
    """Only the ``union`` of ``neighbourhood_stats``: distinct active concepts per neighbourhood, ``(m,)``."""
    neighbours = np.asarray(neighbours, dtype=np.int64)
    m, n_nb = neighbours.shape
    step = max(1, UNION_CHUNK_ENTRIES // max(1, n_nb * codes.values.shape[1]))
    out = np.empty(m, dtype=np.int64)
    for start in range(0, m, step):
        values, indices = _gather(codes, neighbours[start:start + step])
        lat = np.sort(np.where(values > 0, indices, -1).reshape(len(values), -1), axis=1)
        out[start:start + step] = ((lat[:, 1:] != lat[:, :-1]) & (lat[:, 1:] >= 0)).sum(1) + (lat[:, 0] >= 0)
    return out


def _mass_counts(grid: np.ndarray) -> dict:
    """How many of each row's concepts (largest first) carry 50% and 90% of the row's summed activation."""
    masses = -np.sort(-grid, axis=1)
    total = masses.sum(1, keepdims=True)
    frac = np.cumsum(masses, 1) / np.where(total > 0, total, 1.0)
    # Concepts needed: those before the cumulative fraction reaches q, plus the one that reaches it.
    out = {}
    for name, q in (("mass50", 0.5), ("mass90", 0.9)):
        count = (frac < q - 1e-12).sum(1) + 1
        out[name] = np.where(total[:, 0] > 0, count, 0).astype(np.float64)
    return out


def _mean_jaccard(lat: np.ndarray, is_active: np.ndarray, neighbour_of: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Mean over neighbour pairs of |S_i ∩ S_j| / |S_i ∪ S_j|, from each neighbourhood's entries sorted by latent:
    every latent used by c neighbours adds one to the intersection of each of its c(c-1)/2 pairs."""
    m, n_nb = sizes.shape
    if n_nb < 2:
        return np.ones(m)
    import numba  # compiled kernels load only where statistics are computed: a query process needs none

    from analysis.jaccard_kernel import jaccard_kernel

    out = np.empty(m, dtype=np.float64)
    jaccard_kernel(np.ascontiguousarray(lat), np.ascontiguousarray(is_active),
                    np.ascontiguousarray(neighbour_of, dtype=np.int64), np.ascontiguousarray(sizes, dtype=np.int64),
                    max(1, min(numba.get_num_threads(), m)), out)
    return out




def _query_shared(codes: SparseCodes, queries: np.ndarray, lat_sorted: np.ndarray, n_nb: int) -> dict:
    """For each active concept of each query, the fraction of its neighbours that use it."""
    m = lat_sorted.shape[0]
    stride = codes.n_latents + 1
    # Rows are sorted within themselves and offset by row, so the flattened keys are sorted globally.
    keys = (np.arange(m, dtype=np.int64)[:, None] * stride + lat_sorted).ravel()
    q_values, q_indices = _gather(codes, queries[:, None])
    q_values, q_indices = q_values[:, 0], q_indices[:, 0]
    q_keys = np.arange(m, dtype=np.int64)[:, None] * stride + q_indices
    count = np.searchsorted(keys, q_keys, side="right") - np.searchsorted(keys, q_keys, side="left")
    fraction = np.where(q_values > 0, count / n_nb, np.nan)
    n_active = (q_values > 0).sum(1)
    shared = np.where(n_active > 0, np.nansum(fraction, 1) / np.maximum(n_active, 1), 0.0)
    return {"query_shared": shared, "query_fraction": fraction}


def neighbourhood_stats_reference(codes: SparseCodes, neighbours: np.ndarray, queries=None) -> dict:
    """The plain per-query twin of ``neighbourhood_stats`` (sets and loops), for tests."""
    out = {name: [] for name in STAT_NAMES}
    for i, nb in enumerate(np.asarray(neighbours)):
        supports = [set(int(l) for l, v in zip(codes.indices[r], codes.values[r]) if v > 0) for r in nb]
        mass: dict[int, float] = {}
        for r in nb:
            for l, v in zip(codes.indices[r], codes.values[r]):
                if v > 0:
                    mass[int(l)] = mass.get(int(l), 0.0) + float(v)
        out["union"].append(len(set().union(*supports)))
        masses = sorted(mass.values(), reverse=True)
        total = sum(masses)
        for name, q in (("mass50", 0.5), ("mass90", 0.9)):
            acc, count = 0.0, 0
            while total > 0 and acc < q * total - 1e-9 * total:
                acc += masses[count]
                count += 1
            out[name].append(count)
        pairs = [(a, b) for j, a in enumerate(supports) for b in supports[j + 1:]]
        out["jaccard"].append(np.mean([len(a & b) / len(a | b) if a | b else 0.0 for a, b in pairs]) if pairs else 1.0)
        if queries is not None:
            q = queries[i]
            own = [int(l) for l, v in zip(codes.indices[q], codes.values[q]) if v > 0]
            out["query_shared"].append(np.mean([sum(l in s for s in supports) / len(nb) for l in own]) if own else 0.0)
    return {name: np.asarray(v, dtype=np.float64) for name, v in out.items() if v}


# -- baselines ---------------------------------------------------------------------------------------------
NEIGHBOUR_LISTS_BYTES = 2 << 30
"""Most memory the neighbour lists of one study may take (each space and baseline holds ``(m, n_neighbours)`` rows
and scores): a neighbourhood size near the store's size would otherwise ask for many gigabytes."""


def check_lists_fit(n_queries: int, n_neighbours: int, n_lists: int = 1) -> None:
    """Refuse, naming the flags, neighbour lists of ``n_lists`` × ``(n_queries, n_neighbours)`` (int64 rows and
    float32 scores) larger than ``NEIGHBOUR_LISTS_BYTES``."""
    need = n_lists * n_queries * n_neighbours * 12
    if need > NEIGHBOUR_LISTS_BYTES:
        raise ValueError(f"--n-neighbours {n_neighbours} for {n_queries} queries needs {need / 2**30:.1f} GiB of "
                         f"neighbour lists (at most {NEIGHBOUR_LISTS_BYTES / 2**30:.0f} GiB); lower --n-neighbours or "
                         "--n-queries")


def random_neighbourhoods(pool: np.ndarray, queries: np.ndarray, n_neighbours: int, seed: int = 0) -> np.ndarray:
    """``(m, n_neighbours)`` distinct random rows of ``pool`` per query, never the query itself."""
    return _sample(np.asarray(pool, dtype=np.int64), np.asarray(queries, dtype=np.int64), n_neighbours,
                   np.random.default_rng(seed))


def same_label_neighbourhoods(pool: np.ndarray, labels: np.ndarray, queries: np.ndarray, n_neighbours: int,
                              seed: int = 0) -> np.ndarray:
    """``(m, n_neighbours)`` random members of each query's class among ``pool`` (never the query itself)."""
    pool, queries = np.asarray(pool, dtype=np.int64), np.asarray(queries, dtype=np.int64)
    labels = np.asarray(labels)
    if (labels[queries] < 0).any():
        raise ValueError("same-label neighbourhoods need labelled queries; the store has unlabelled rows")
    rng = np.random.default_rng(seed)
    out = np.empty((queries.size, n_neighbours), dtype=np.int64)
    for label in np.unique(labels[queries]):
        which = np.flatnonzero(labels[queries] == label)
        out[which] = _sample(pool[labels[pool] == label], queries[which], n_neighbours, rng)
    return out


def _sample(pool: np.ndarray, queries: np.ndarray, n_neighbours: int, rng: np.random.Generator) -> np.ndarray:
    if pool.size - 1 < n_neighbours:
        raise ValueError(f"a baseline neighbourhood of {n_neighbours} needs more than {pool.size} rows to draw from; "
                         "lower --n-neighbours")
    # Draws with replacement are distinct almost always in a large pool; the few rows that are not (or that hit
    # their own query) are drawn again without replacement.
    out = pool[rng.integers(0, pool.size, (queries.size, n_neighbours))]
    srt = np.sort(out, axis=1)
    bad = (srt[:, 1:] == srt[:, :-1]).any(1) | (out == queries[:, None]).any(1)
    for i in np.flatnonzero(bad):
        choices = pool[pool != queries[i]]
        out[i] = rng.choice(choices, n_neighbours, replace=False)
    return out


# -- O1: similarity preservation ---------------------------------------------------------------------------
def code_cosines(codes: SparseCodes, queries: np.ndarray, neighbours: np.ndarray, batch: int = 1024) -> np.ndarray:
    """Concept-space cosine ``cos(Φ̂(x_q), Φ̂(x_j))`` of each query and each of its neighbours, ``(m, N)``."""
    queries, neighbours = np.asarray(queries, dtype=np.int64), np.asarray(neighbours, dtype=np.int64)
    out = np.empty(neighbours.shape, dtype=np.float64)
    for start in range(0, queries.size, batch):
        q_v, q_i = _gather(codes, queries[start : start + batch, None])
        n_v, n_i = _gather(codes, neighbours[start : start + batch])
        q_v = q_v / np.maximum(np.linalg.norm(q_v, axis=2, keepdims=True), 1e-12)
        n_v = n_v / np.maximum(np.linalg.norm(n_v, axis=2, keepdims=True), 1e-12)
        # (b, N, k, k): which of a neighbour's latents equals which of the query's.
        same = n_i[:, :, :, None] == q_i[:, :, None, :]
        out[start : start + batch] = np.einsum("bnij,bnj,bni->bn", same, np.broadcast_to(q_v, n_v.shape), n_v)
    return out


def neighbour_overlap(rows_a: np.ndarray, rows_b: np.ndarray) -> np.ndarray:
    """Per query, the fraction of neighbours two searches have in common, ``(m,)``."""
    m, n = rows_a.shape
    offset = np.arange(m, dtype=np.int64)[:, None] * (int(max(rows_a.max(), rows_b.max())) + 1)
    return np.isin(rows_a + offset, rows_b + offset).reshape(m, n).sum(1) / n
