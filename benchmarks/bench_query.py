"""Per-image queries at scale: in-process latency in every space against the exact scan, and the whole process.

For each of ``--sizes``: an ImageNet-shaped synthetic store (unit rows of width 512 around 1,000 cluster centres,
written through the real ``EmbeddingStore`` writer), a random top-k SAE (4,096 latents, k = 16) and its CodeStore
encoded by the real stage; kept in ``--work-dir`` and reused by later runs. The SAE's atoms are 4,096 store rows
(encoder = decoder transposed): a stand-in for a trained SAE whose codes and reconstructions keep the clusters, as
a trained one's do; a random SAE's reconstructions are structureless points in 512 dimensions, where no index
beats a scan. Then, in one process:

- per space (embeddings, reconstructions, codes): the index the query tool chooses (built once and saved beside
  the codes; its build time, kind, ``nprobe`` and the recall@10 it recorded against exact on the store) and, as
  the baseline, the exact flat scan (``--exact``; code space is exact either way), both through ``QueryEngine``,
  with their files read once into the page cache (as in a long-running process; the first queries of a cold
  1.28M-row index wait for the disk) and first warmed on ``--n-queries`` other rows (concept descriptions are
  computed once per concept), then asked the same ``--n-queries`` random rows interleaved (baseline, chosen,
  chosen, baseline, ...), 10 neighbours each:
  the median and p99 latency of each, their ratio, and the recall@10 of the chosen index's answers against the
  baseline's on these very queries;
- the whole ``scripts/query.py --json`` process with the saved index, ``--n-process`` runs per space: median and
  min wall time, and the import time of one more run under ``-X importtime``.

Each row prints the load average and ``OMP_WAIT_POLICY``. Targets: median < 10 ms and p99 < 50 ms at 100,000
rows in every space (median < 50 ms at 1.28M); the process < 2 s at 100,000 rows, < 5 s at 1.28M.

    python benchmarks/bench_query.py [--sizes 100000,1281167] [--n-queries 100] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.concepts.query import QueryEngine  # noqa: E402
from analysis.neighbours import recall_at_n  # noqa: E402
from analysis.space_index import IndexSettings  # noqa: E402
from analysis.spaces import SPACE_NAMES  # noqa: E402
from embeddings.store import EmbeddingStore  # noqa: E402
from sae.codes import CodeStore  # noqa: E402

from machine import cpu_model, load_average  # noqa: E402  (this folder, first on the path of a script)


def machine_line() -> str:
    return f"machine: {cpu_model()}, {os.cpu_count()} cpus"


def load_line() -> str:
    return (f"load average {load_average()}, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")


def clustered_rows(n: int, d: int, n_clusters: int = 1000, seed: int = 0, noise: float = 0.8):
    """``(x (n, d) unit float32 rows, cluster of each row)``: cluster centres plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, d)).astype(np.float32)
    cluster = rng.integers(0, n_clusters, n)
    x = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 65536):
        c = cluster[start : start + 65536]
        xb = centres[c] + noise * rng.normal(size=(len(c), d)).astype(np.float32)
        x[start : start + len(c)] = xb / np.linalg.norm(xb, axis=1, keepdims=True)
    return x, cluster


def make_artifacts(work: Path, n: int, noise: float, d: int = 512, n_latents: int = 4096, k: int = 16,
                   seed: int = 0) -> Path:
    """The store, the SAE and its codes under ``work`` (reused when already there)."""
    import torch

    from analysis.run.store_stages import encode_store
    from embeddings.store import write_store
    from sae.checkpoint import save_sae
    from sae.config import SAEConfig
    from sae.model import TopKSAE

    base = work / (f"n{n}" if noise == 0.8 else f"n{n}-noise{noise}")
    if (base / "codes" / "meta.json").is_file():
        return base
    base.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    x, cluster = clustered_rows(n, d, seed=seed, noise=noise)
    test = np.sort(np.random.default_rng(seed).choice(n, n // 25, replace=False))
    store = write_store(base / "store", x, labels=cluster, classes=[f"class{i}" for i in range(1000)],
                        ids=[f"img{i:07d}.jpg" for i in range(n)],
                        split={"train": np.setdiff1d(np.arange(n), test), "test": test}, overwrite=True)
    model = TopKSAE(SAEConfig(d_in=d, n_latents=n_latents, k=k))
    atoms = torch.from_numpy(x[np.sort(np.random.default_rng(seed + 1).choice(n, n_latents, replace=False))])
    del x
    with torch.no_grad():
        model.W_dec.copy_(atoms), model.W_enc.copy_(atoms.T), model.b_enc.zero_(), model.b_dec.zero_()
    save_sae(model, base / "sae", parent_store_hash=store.content_hash, overwrite=True)
    encode_store(base / "store", base / "sae", base / "codes", overwrite=True, verify_store=False)
    print(f"  wrote store + SAE + codes of {n} rows in {time.perf_counter() - t:.0f} s")
    return base


def timed_query(engine: QueryEngine, row: int, space: str) -> tuple[float, np.ndarray]:
    t = time.perf_counter()
    answer = engine.query(row, 10, space)
    return (time.perf_counter() - t) * 1e3, np.array([nb["row"] for nb in answer["neighbours"]])


def read_through(directory: Path | None) -> float:
    """Read every file of ``directory`` once (into the page cache: a mapped index is then served from memory, as
    in a long-running process); returns the seconds it took."""
    t = time.perf_counter()
    buffer = bytearray(1 << 26)
    for path in sorted(directory.iterdir()) if directory is not None else []:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    return time.perf_counter() - t


def bench_space(chosen: QueryEngine, exact: QueryEngine, space: str, rows: np.ndarray, warm: np.ndarray) -> None:
    for name, engine in (("chosen", chosen), ("exact", exact)):
        t = time.perf_counter()
        index = engine.index(space)
        how = "reused" if index.reused else "built and saved"
        print(f"  {space} {name} index: {index.quality['factory']} nprobe {index.quality['nprobe']}, {how} in "
              f"{time.perf_counter() - t:.1f} s (its files read into the page cache in "
              f"{read_through(index.path):.1f} s); recorded recall@10 "
              f"{index.quality['recall']['10']['value']:.4f} on {index.quality['n_sample']} store rows")
    for row in warm:  # other rows first: concept descriptions and the maps' shared pages are loaded once
        timed_query(chosen, int(row), space), timed_query(exact, int(row), space)
    lat = {"chosen": [], "exact": []}
    found, truth = [], []
    for i, row in enumerate(rows):
        for name in (("exact", "chosen") if i % 2 == 0 else ("chosen", "exact")):  # interleaved, both orders
            ms, nb = timed_query(chosen if name == "chosen" else exact, int(row), space)
            lat[name].append(ms)
            (found if name == "chosen" else truth).append(nb)
    recall = recall_at_n(np.stack(found), np.stack(truth))
    med = {k: float(np.median(v)) for k, v in lat.items()}
    p99 = {k: float(np.percentile(v, 99)) for k, v in lat.items()}
    print(f"  {space}: chosen median {med['chosen']:.1f} ms, p99 {p99['chosen']:.1f} ms | exact scan median "
          f"{med['exact']:.1f} ms, p99 {p99['exact']:.1f} ms | exact/chosen median {med['exact'] / med['chosen']:.1f}x "
          f"| recall@10 vs exact on these {len(rows)} queries {recall['value']:.4f} | {load_line()}")


def bench_process(base: Path, space: str, rows: np.ndarray) -> None:
    args = [sys.executable, str(ROOT / "scripts" / "query.py"), "--sae", str(base / "sae"), "--store",
            str(base / "store"), "--codes", str(base / "codes"), "--space", space, "--json"]
    walls, cpus = [], []
    for row in rows:
        t, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(args + ["--index", str(row)], capture_output=True, text=True, cwd=ROOT)
        walls.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        if done.returncode:
            raise SystemExit(f"scripts/query.py failed: {done.stderr.strip()}")
    done = subprocess.run([sys.executable, "-X", "importtime"] + args[1:] + ["--index", str(rows[0])], check=True,
                          capture_output=True, text=True, cwd=ROOT)
    imports = sum(int(m.group(1)) for m in re.finditer(r"import time:\s+\d+\s+\|\s+(\d+)\s+\| \S", done.stderr))
    heavy = [name for name in ("torch", "matplotlib", "sklearn", "umap", "selenium", "scipy")
             if re.search(rf"\|\s+{name}$", done.stderr, re.MULTILINE)]
    print(f"  process scripts/query.py --json --space {space}: wall median {np.median(walls):.2f} s, min "
          f"{min(walls):.2f} s over {len(walls)} runs; CPU (user + system) median {np.median(cpus):.2f} s; "
          f"imports {imports / 1e6:.2f} s wall (heavy modules imported: "
          f"{', '.join(heavy) or 'none'}) | {load_line()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1281167", help="comma-separated store sizes")
    parser.add_argument("--n-queries", type=int, default=100, help="in-process queries per space and engine")
    parser.add_argument("--n-process", type=int, default=5, help="whole-process runs per space")
    parser.add_argument("--spaces", default=",".join(SPACE_NAMES))
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "bench-query"),
                        help="where the stores are kept (and reused by later runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.8,
                        help="per-coordinate noise around the cluster centres (larger: clusters overlap, harder "
                             "for an IVF index; 0.8 as in bench_concepts.py)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="write the stores and build (and save) every index, then stop")
    args = parser.parse_args()
    print(machine_line())
    print(load_line())
    for n in (int(s) for s in args.sizes.split(",")):
        print(f"\n== {n} rows x 512 (noise {args.noise}), 4096 latents, k=16; 10 neighbours ==")
        base = make_artifacts(Path(args.work_dir), n, args.noise, seed=args.seed)
        store, codes = EmbeddingStore.open(base / "store"), CodeStore.open(base / "codes")
        t = time.perf_counter()
        chosen = QueryEngine(store, base / "sae", codes)
        exact = QueryEngine(store, base / "sae", codes, settings=IndexSettings(exact=True))
        print(f"  two engines loaded in {time.perf_counter() - t:.2f} s")
        picked = np.random.default_rng(args.seed).choice(n, 2 * args.n_queries, replace=False)
        rows, warm = picked[: args.n_queries], picked[args.n_queries :]
        if args.prepare_only:
            for space in args.spaces.split(","):
                for name, engine in (("chosen", chosen), ("exact", exact)):
                    t = time.perf_counter()
                    index = engine.index(space)
                    print(f"  {space} {name} index {index.quality['factory']} nprobe {index.quality['nprobe']}: "
                          f"{'reused' if index.reused else 'built, measured and saved'} in "
                          f"{time.perf_counter() - t:.1f} s | {load_line()}")
            continue
        for space in args.spaces.split(","):
            bench_space(chosen, exact, space, rows, warm)
        for space in args.spaces.split(","):
            bench_process(base, space, rows[: args.n_process])
    print(f"\n{load_line()}")


if __name__ == "__main__":
    main()
