"""Local TTT throughput: the per-query reference loop vs the batched exact and fast modes, same data, same process.

Synthetic data shaped like ImageNet under CLIP (``analysis/ttt/data.py``): 1000 classes, 512-d unit-norm
features made from locally sparse concepts, so that TTT really helps; 60 neighbours, 50 full-batch Adam steps
at lr 1e-2 (the paper's ImageNet protocol). Prints the matmul kernels' speed on this CPU, the accuracies
(global / TTT / majority, so that the benchmark is visibly not degenerate), the agreement of the modes, and
each mode's queries per second with its ratio to the reference loop.

    python benchmarks/bench_ttt.py [--n-train 30000] [--n-test 2000] [--n-exact 300] [--n-ref 40] [--n-bf16 300]
        [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import numpy as np
import torch

from analysis.heads import HeadConfig, train_head
from analysis.stats import accuracy, paired_difference
from analysis.local_ttt import LocalTTT, TTTConfig
from analysis.ttt.data import SparseTopics, sparse_topics


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=30000, help="training rows (neighbour pool)")
    p.add_argument("--n-test", type=int, default=2000, help="test queries of the fast mode and the baselines")
    p.add_argument("--n-exact", type=int, default=300, help="queries of the exact mode (a prefix of the test set)")
    p.add_argument("--n-ref", type=int, default=40, help="queries of the reference loop (a prefix)")
    p.add_argument("--n-bf16", type=int, default=300, help="queries of the bf16 exact mode (a prefix)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--head-epochs", type=int, default=8, help="epochs of the global head")
    p.add_argument("--device", default="cpu", help="device of the batched modes (the reference stays on CPU)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def gflops(f, flop: float, repeat: int = 5) -> float:
    f()
    start = time.perf_counter()
    for _ in range(repeat):
        f()
    return flop * repeat / (time.perf_counter() - start) / 1e9


def matmul_kernels() -> None:
    """The TTT forward's matmul shape, ``(64·60, 512) @ (512, 1000)``, through each route torch offers here."""
    a, b = torch.randn(64 * 60, 512), torch.randn(512, 1000)
    flop = 2 * a.shape[0] * 512 * 1000
    za, zb = torch.randn(64, 60, 512), torch.randn(64, 512, 1000)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, MKL {torch.backends.mkl.is_available()}, "
          f"oneDNN {torch.backends.mkldnn.is_available()}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"  fp32 mm (MKL sgemm)          {gflops(lambda: a @ b, flop):7.1f} GFLOP/s")
    print(f"  fp32 bmm (64 problems)       {gflops(lambda: torch.bmm(za, zb), flop):7.1f} GFLOP/s")
    ab, bb = a.bfloat16(), b.bfloat16()
    print(f"  bf16 mm (oneDNN)             {gflops(lambda: ab @ bb, flop):7.1f} GFLOP/s")
    mm = getattr(torch.backends.mkldnn, "matmul", None)
    if mm is not None and hasattr(mm, "fp32_precision"):
        before = mm.fp32_precision
        try:
            mm.fp32_precision = "bf16"
            print(f"  fp32 mm as oneDNN bf32       {gflops(lambda: a @ b, flop):7.1f} GFLOP/s (not exact fp32)")
        finally:
            mm.fp32_precision = before


def timed(ttt: LocalTTT, x, neighbours):
    start = time.perf_counter()
    result = ttt.predict(x, neighbours=neighbours)
    return result, time.perf_counter() - start


def fmt(m: dict) -> str:
    return f"{m['value']:.4f} ± {m['se']:.4f} (n={m['n']})"


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")
    matmul_kernels()
    spec = SparseTopics(n=args.n_train + args.n_test, dim=512, n_concepts=4096, n_classes=1000, n_topics=300,
                        topic_size=6, n_private=2, private_scale=0.5, value_law="exponential", seed=args.seed)
    x, y, _ = sparse_topics(spec)
    x_tr, y_tr, x_te, y_te = x[:args.n_train], y[:args.n_train], x[args.n_train:], y[args.n_train:]
    start = time.perf_counter()
    head = train_head(x_tr, y_tr, HeadConfig(epochs=args.head_epochs, lr=3e-3, batch_size=500, seed=args.seed),
                      n_outputs=1000)
    print(f"data: {dataclasses.asdict(spec)}\nglobal head trained in {time.perf_counter() - start:.0f} s")
    base = TTTConfig(n_neighbours=60, mode="erm", steps=50, lr=1e-2, metric="l2")
    ttts = {name: LocalTTT(head, dataclasses.replace(base, **kw), device=args.device if name != "reference" else "cpu")
            .fit(x_tr, y_tr) for name, kw in {"reference": {"impl": "reference"}, "exact": {"impl": "exact"},
                                              "fast": {"impl": "fast"},
                                              "exact bf16": {"impl": "exact", "precision": "bfloat16"},
                                              "fast bf16": {"impl": "fast", "precision": "bfloat16"}}.items()}
    start = time.perf_counter()
    nb = ttts["fast"].neighbours(x_te)
    batched_search = (time.perf_counter() - start) / len(x_te)
    start = time.perf_counter()
    for i in range(100):
        ttts["fast"].neighbours(x_te[i:i + 1])
    single_search = (time.perf_counter() - start) / 100
    print(f"neighbour search: batched {batched_search * 1e3:.3f} ms/query, one query at a time "
          f"{single_search * 1e3:.3f} ms/query")
    sizes = {"reference": args.n_ref, "exact": args.n_exact, "fast": args.n_test, "exact bf16": min(args.n_bf16, args.n_exact),
             "fast bf16": args.n_test}
    results, per_query = {}, {}
    for name, ttt in ttts.items():
        m = sizes[name]
        results[name], seconds = timed(ttt, x_te[:m], nb[:m])
        per_query[name] = seconds / m
    report(results, per_query, sizes, y_te)


def report(results: dict, per_query: dict, sizes: dict, y: np.ndarray) -> None:
    fast = results["fast"]
    t = y[:sizes["fast"]]
    print(f"accuracy on {sizes['fast']} test queries (fast mode):")
    print(f"  global head   {fmt(accuracy(fast.global_predictions == t))}")
    print(f"  local TTT     {fmt(accuracy(fast.predictions == t))}")
    print(f"  kNN majority  {fmt(accuracy(fast.majority == t))}")
    print(f"  TTT - global  {fmt(paired_difference(fast.predictions == t, fast.global_predictions == t))}")
    e = results["exact"]
    te = y[:sizes["exact"]]
    print(f"exact on {sizes['exact']}: TTT {fmt(accuracy(e.predictions == te))}")
    print("agreement of predictions:")
    for a, b in (("exact", "reference"), ("fast", "exact"), ("exact bf16", "exact"), ("fast bf16", "exact")):
        m = min(sizes[a], sizes[b])
        same = results[a].predictions[:m] == results[b].predictions[:m]
        diff = paired_difference(results[a].predictions[:m] == y[:m], results[b].predictions[:m] == y[:m])
        print(f"  {a:10s} vs {b:9s} {fmt(accuracy(same))}; TTT accuracy difference {fmt(diff)}")
    print("throughput (queries/s; ratio to the reference loop):")
    for name, sec in per_query.items():
        print(f"  {name:10s} {1 / sec:9.2f} q/s  {per_query['reference'] / sec:8.1f}x  (on {sizes[name]} queries)")


if __name__ == "__main__":
    main()
