"""Concept analysis at scale: neighbour indexes, code-space search, sharing statistics and one query.

Synthetic data shaped like ImageNet under CLIP and the paper's SAE: ``--n-rows`` unit-norm embeddings of width
512 with cluster structure (1,000 clusters), codes with 4,096 latents and k = 16 drawn from per-cluster pools of
latents whose global popularity is Zipf-skewed (a realistic, skewed latent frequency). Every row prints its
baseline from the same run:

- CodeStore views: build time and memory of the inverted lists and of the code-space index, against the
  CodeStore's own size;
- dense search in Ψ: exact flat queries/s against the bare matmul of the same queries (the floor); IVF and HNSW
  against exact, with recall@50 (target: >= 20x exact at recall@50 >= 0.95);
- code-space search from the inverted lists against a dense brute force on a subsample (equal results), and its
  queries/s at full size (target: >= 200 queries/s, memory < 1.5x the CodeStore);
- sharing statistics for 10,000 queries x 50 neighbours against the per-query reference twin (target: < 5 s).

Per-image queries (the query tool's saved index in every space, and the whole process) are measured by
``benchmarks/bench_query.py``.

    python benchmarks/bench_concepts.py [--n-rows 1281167] [--skip-hnsw] [--sections dense,codes,sharing]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
import torch

from analysis import neighbourhoods as nbh
from analysis.neighbours import NeighbourIndex, SparseCodes, recall_at_n
from analysis.spaces import codes_from_arrays



def rss_mb() -> float:
    """Resident memory now (MB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def synthetic(n: int, d: int, n_latents: int, k: int, seed: int = 0, n_clusters: int = 1000, pool: int = 48):
    """``(x (n, d) unit rows, codes, cluster of each row)``; see the module docstring."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, d)).astype(np.float32)
    cluster = rng.integers(0, n_clusters, n)
    popularity = 1.0 / np.arange(1, n_latents + 1) ** 0.6
    popularity = rng.permutation(popularity / popularity.sum())
    pools = np.stack([rng.choice(n_latents, pool, replace=False, p=popularity) for _ in range(n_clusters)])
    x = np.empty((n, d), dtype=np.float32)
    indices = np.empty((n, k), dtype=np.int32)
    for start in range(0, n, 65536):
        rows = slice(start, min(start + 65536, n))
        c = cluster[rows]
        xb = centres[c] + 0.8 * rng.normal(size=(len(c), d)).astype(np.float32)
        x[rows] = xb / np.linalg.norm(xb, axis=1, keepdims=True)
        # k distinct pool positions per row: the k smallest of random keys.
        pos = np.argpartition(rng.random((len(c), pool)), k, axis=1)[:, :k]
        indices[rows] = np.take_along_axis(pools[c], pos, 1)
    values = -np.sort(-rng.exponential(1.0, (n, k)).astype(np.float32), axis=1) + 0.01
    return x, SparseCodes(values, indices, n_latents), cluster


def bench_views(codes: SparseCodes) -> tuple:
    print("\n== CodeStore views ==")
    store_mb = (codes.values.nbytes + codes.indices.nbytes + codes.n * codes.values.shape[1] * 8) / 2**20
    before = rss_mb()
    cs, t = timed(codes_from_arrays, codes.values, codes.indices, codes.n_latents)
    print(f"CodeStore (values + indices + inverted lists): {store_mb:.0f} MB; inverted lists built in {t:.2f} s, "
          f"+{rss_mb() - before:.0f} MB resident")
    before = rss_mb()
    index, t = timed(NeighbourIndex().fit, codes)
    index_mb = sum(a.nbytes for a in (index.inverted_.data, index.inverted_.indices, index.inverted_.indptr)) / 2**20
    print(f"code-space index (normalised inverted lists): built in {t:.2f} s, arrays {index_mb:.0f} MB, "
          f"+{rss_mb() - before:.0f} MB resident = {index_mb / store_mb:.2f}x the CodeStore (target < 1.5x)")
    return cs, index


def bench_dense(x: np.ndarray, n_queries: int, skip_hnsw: bool, seed: int, nlist: int | None,
                device: str = "cpu") -> np.ndarray:
    print(f"\n== dense search in embeddings (cosine), 50 neighbours, FAISS on {device} ==")
    rng = np.random.default_rng(seed)
    qrows = rng.choice(len(x), n_queries, replace=False)
    q = x[qrows]
    exact_index, t_build = timed(NeighbourIndex(device=device).fit, x)
    (_, exact), t_exact = timed(exact_index.search, q, 50)
    # Floor: the bare matmul of the same queries against every row, in the index's batch size.
    t = time.perf_counter()
    for start in range(0, n_queries, 1024):
        np.dot(q[start : start + 1024], x.T)
    t_floor = time.perf_counter() - t
    print(f"exact Flat: build {t_build:.2f} s, {n_queries / t_exact:.0f} queries/s; bare matmul "
          f"{n_queries / t_floor:.0f} queries/s: Flat takes {t_exact / t_floor:.2f}x the matmul floor")
    nlist = nlist or int(np.sqrt(len(x)))
    rows = [(f"IVF{nlist},Flat", "nprobe", p) for p in (1, 2, 4, 8, 16, 32)]
    if not skip_hnsw:
        rows += [("HNSW32", "ef_search", e) for e in (64, 128, 256)]
    built: dict[str, tuple] = {}
    for factory, knob, value in rows:
        if factory not in built:
            built[factory] = timed(NeighbourIndex(factory=factory, device=device).fit, x)
            print(f"{factory}: build {built[factory][1]:.1f} s, +{peak_mb():.0f} MB peak RSS so far")
        index = built[factory][0].set_search_parameters(**{knob: value})
        (_, found), t = timed(index.search, q, 50)
        r = recall_at_n(found, exact)
        print(f"  {factory} {knob}={value}: {n_queries / t:.0f} queries/s = {t_exact / t:.1f}x exact, "
              f"recall@50 {r['value']:.4f} ± {r['se']:.4f}")
    return exact


def bench_code_search(codes: SparseCodes, index: NeighbourIndex, n_queries: int, subsample: int, seed: int):
    print("\n== exact code-space search (cosine) from the inverted lists, 50 neighbours ==")
    rng = np.random.default_rng(seed)
    qrows = rng.choice(codes.n, n_queries, replace=False)
    index.search(codes.take(qrows[:2]), 50)  # compiles the kernel (or loads it from numba's cache)
    (s_fast, rows), t = timed(index.search, codes.take(qrows), 50, exclude=qrows)
    n_ref = min(n_queries, 200)
    reference = NeighbourIndex(fast=False).fit(codes)
    (s_ref, r_ref), t_ref = timed(reference.search, codes.take(qrows[:n_ref]), 50, exclude=qrows[:n_ref])
    print(f"full size ({codes.n} rows): compiled kernel {n_queries / t:.0f} queries/s (target >= 200); its plain "
          f"reference twin (sparse product + selection in Python) {n_ref / t_ref:.0f} queries/s "
          f"({t / n_queries / (t_ref / n_ref):.2f}x the time); same rows: {np.array_equal(rows[:n_ref], r_ref)}, "
          f"max |score difference| {np.abs(s_fast[:n_ref] - s_ref).max():.1e}")
    sub = codes.take(np.arange(min(subsample, codes.n)))
    sub_q = np.arange(min(500, sub.n))
    sub_index = NeighbourIndex().fit(sub)
    (s_sparse, r_sparse), t_sparse = timed(sub_index.search, sub.take(sub_q), 50, exclude=sub_q)
    t = time.perf_counter()
    dense = sub.dense()
    dense /= np.maximum(np.linalg.norm(dense, axis=1, keepdims=True), 1e-12)
    sims = dense[sub_q] @ dense.T
    sims[np.arange(sub_q.size), sub_q] = -np.inf
    top = -np.sort(-sims, axis=1)[:, :50]
    t_dense = time.perf_counter() - t
    same = np.abs(s_sparse - top).max()
    print(f"subsample {sub.n} rows, {sub_q.size} queries: inverted lists {sub_q.size / t_sparse:.0f} queries/s, "
          f"dense brute force {sub_q.size / t_dense:.0f} queries/s ({t_dense / t_sparse:.1f}x); "
          f"max |score difference| {same:.2e} (exact: equal up to float32 rounding)")
    return qrows, rows


def bench_sharing(codes: SparseCodes, n_queries: int, seed: int) -> None:
    print(f"\n== sharing statistics, {n_queries} queries x 50 neighbours ==")
    rng = np.random.default_rng(seed)
    qrows = rng.choice(codes.n, n_queries, replace=False)
    # Real neighbourhoods from code space: an exact Flat search of 10,000 queries in Ψ at full size is minutes of
    # matmul on 2 cores, and the statistics' cost depends only on the neighbourhoods' shape.
    neighbours = NeighbourIndex().fit(codes).search(codes.take(qrows), 50, exclude=qrows)[1]
    random_nb = nbh.random_neighbourhoods(np.arange(codes.n), qrows, 50, seed)
    for name, nb in (("real (code-space neighbours)", neighbours), ("random", random_nb)):
        stats, t = timed(nbh.neighbourhood_stats, codes, nb, qrows)
        cos, t_cos = timed(nbh.code_cosines, codes, qrows, nb)
        few = 100
        _, t_ref = timed(nbh.neighbourhood_stats_reference, codes, nb[:few], qrows[:few])
        print(f"{name}: statistics {t:.2f} s (target < 5 s) + O1 cosines {t_cos:.2f} s; reference twin "
              f"{t_ref / few * 1e3:.1f} ms/query -> {t_ref / few * n_queries / t:.0f}x slower; "
              f"union {stats['union'].mean():.1f}, mass90 {stats['mass90'].mean():.1f}, "
              f"jaccard {stats['jaccard'].mean():.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-rows", type=int, default=200_000, help="rows of the synthetic set (ImageNet: 1281167)")
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--n-latents", type=int, default=4096)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--n-queries", type=int, default=2000, help="queries of the search rows")
    parser.add_argument("--sharing-queries", type=int, default=10_000)
    parser.add_argument("--subsample", type=int, default=20_000, help="rows of the dense brute-force comparison")
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default sqrt(n-rows))")
    parser.add_argument("--skip-hnsw", action="store_true", help="leave out HNSW (slow to build on 2 cores)")
    parser.add_argument("--sections", default="dense,codes,sharing",
                        help="comma-separated sections to run after the CodeStore views")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="FAISS device of the dense section: cpu or cuda (faiss-gpu)")
    args = parser.parse_args()
    print(f"machine: {os.uname().machine} cpus={os.cpu_count()} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} load average {os.getloadavg()[0]:.1f}")
    print(f"data: {args.n_rows} rows x {args.d}, {args.n_latents} latents, k={args.k}")
    (x, codes, _), t = timed(synthetic, args.n_rows, args.d, args.n_latents, args.k, args.seed)
    freq = np.bincount(codes.indices.ravel(), minlength=args.n_latents) / args.n_rows
    print(f"generated in {t:.1f} s; latent frequency: max {freq.max():.3%}, median {np.median(freq):.4%}, "
          f"never used {(freq == 0).mean():.1%}; resident {rss_mb():.0f} MB")
    sections = set(args.sections.split(","))
    _, code_index = bench_views(codes)
    if "dense" in sections:
        bench_dense(x, args.n_queries, args.skip_hnsw, args.seed, args.nlist, args.device)
    if "codes" in sections:
        bench_code_search(codes, code_index, args.n_queries, args.subsample, args.seed)
    if "sharing" in sections:
        bench_sharing(codes, args.sharing_queries, args.seed)
    print(f"\npeak RSS {peak_mb():.0f} MB; load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
