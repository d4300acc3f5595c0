"""Local TTT speed: a plain per-query loop against the toolkit's reference, exact and fast modes, interleaved.

Synthetic data shaped like ImageNet under CLIP (``analysis/ttt/data.py``, a data set of its own, not the tests'):
1000 classes, 512-d unit-norm features made from locally sparse concepts, so that TTT really helps; 60
neighbours (exact L2), 50 full-batch Adam steps at lr 1e-2 (the paper's ImageNet protocol). The baseline is the
plain loop a user would write (per query: deep copy of the last layer, a new ``torch.optim.Adam``, 50 steps), run
in a process of its own (``ttt_loop.py``) under the OpenMP wait policy a user's process has: libgomp's default,
not the sleeping policy the toolkit sets for itself, under which such a loop of tiny operations runs about half as
fast on 2 cores. Every other row runs through ``LocalTTT.predict`` in this process with the neighbours given, so
the search is timed apart; ``reference`` is the toolkit's own per-query loop.

The modes run in ``--rounds`` rounds; each round gives every mode its next chunk of queries, so that a change in
the machine's load hits all modes alike. Per mode: milliseconds per query (median over rounds, and the range),
the ratio to the loop (median of the per-round ratios, and their range), prediction agreement with the loop and
accuracy. A loop of many tiny operations slows far more under contention (threads waiting on a busy core) than a
batched one, so the ratios are printed only when other processes took at most half a core during the rounds
(from ``/proc/stat``, less this benchmark's and its loop process's own CPU time: spinning threads of the
benchmark itself raise the load average without loading the machine; where ``/proc/stat`` is missing, the load
average must stay at or below the core count); otherwise they are withheld, or with ``--allow-loaded`` printed
marked LOADED.

    python benchmarks/bench_ttt.py [--n-train 30000] [--n-test 2000] [--n-slow 500] [--rounds 10] [--threads 2]
        [--no-fp32] [--allow-loaded] [--device cuda]
"""

from __future__ import annotations

import os

POLICY_GIVEN = os.environ.get("OMP_WAIT_POLICY")
import analysis  # noqa: E402,F401  (first, as the scripts: the toolkit's OpenMP wait policy, before torch loads)

import argparse  # noqa: E402
import json  # noqa: E402
import dataclasses  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from analysis.heads import HeadConfig, predict_head, train_head  # noqa: E402
from analysis.local_ttt import LocalTTT, TTTConfig  # noqa: E402
from analysis.stats import accuracy, paired_difference  # noqa: E402
from analysis.ttt.data import SparseTopics, sparse_topics  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model, load_average  # noqa: E402
from ttt_loop import save_problem  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=30000, help="training rows, the neighbour pool (default 30000)")
    p.add_argument("--n-test", type=int, default=2000, help="queries of the fast modes (default 2000)")
    p.add_argument("--n-slow", type=int, default=500,
                   help="queries of the loop, reference and exact rows: a prefix of the test set (default 500)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--no-fp32", action="store_true", help="leave out the float32 rows of exact and fast")
    p.add_argument("--allow-loaded", action="store_true", help="print the ratios of a loaded run, marked LOADED")
    p.add_argument("--head-epochs", type=int, default=8, help="epochs of the global head (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the head (default 0)")
    p.add_argument("--device", default="cpu",
                   help="torch device of the exact and fast rows (default cpu); the loop and reference stay on CPU")
    return p.parse_args()


# -- the machine --------------------------------------------------------------------------------------------
def busy_jiffies() -> int:
    """CPU time of the whole machine in clock ticks, idle and iowait left out (``/proc/stat``; 0 elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0
    return sum(fields) - fields[3] - fields[4]


def describe_machine() -> None:
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f" {f}" in flags]
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, bf16 flags {bf16 or 'none'}, {platform.system()}")
    policy = os.environ.get("OMP_WAIT_POLICY", "unset (libgomp: spin a while, then sleep)")
    origin = "from the environment" if POLICY_GIVEN else "the toolkit's default (artifacts/threads.py)"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; OpenMP: OMP_WAIT_POLICY={policy} ({origin}), "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'unset')}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    a, b = torch.randn(64 * 60, 512), torch.randn(512, 1000)
    for name, (x, w) in {"fp32": (a, b), "bf16": (a.bfloat16(), b.bfloat16())}.items():
        x @ w
        start = time.perf_counter()
        for _ in range(5):
            x @ w
        rate = 5 * 2 * a.shape[0] * 512 * 1000 / (time.perf_counter() - start) / 1e9
        print(f"  {name} matmul (3840, 512) @ (512, 1000): {rate:6.1f} GFLOP/s")
    print(f"load average at start: {load_average()}")


# -- the modes ----------------------------------------------------------------------------------------------
class LoopProcess:
    """The plain loop (``ttt_loop.py``) in a process of its own, under the OpenMP wait policy a user's process
    has: the environment's, or libgomp's default when only the toolkit set one. Called with rows, it returns
    ``(predictions, its CPU milliseconds)``."""

    def __init__(self, folder: Path, threads: int):
        env = dict(os.environ)
        if POLICY_GIVEN is None:
            env.pop("OMP_WAIT_POLICY", None)
        self.policy = env.get("OMP_WAIT_POLICY", "unset (libgomp's default)")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent / "ttt_loop.py"),
                                      str(folder), str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the loop process ended (exit status {self.proc.wait()})")
        return json.loads(line)

    def __call__(self, rows: np.ndarray):
        self.proc.stdin.write(f"{rows[0]} {rows[-1] + 1}\n")
        self.proc.stdin.flush()
        answer = self._read()
        return np.asarray(answer["predictions"]), answer["cpu_ms"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def build_modes(head, x_tr, y_tr, args) -> dict:
    """``name -> (predict(rows) -> predictions, number of queries)``."""
    base = TTTConfig(n_neighbours=60, mode="erm", steps=50, lr=1e-2, metric="l2")
    kinds = {"reference": dict(impl="reference"), "exact": dict(impl="exact"), "fast": dict(impl="fast")}
    if not args.no_fp32:
        kinds.update({"exact fp32": dict(impl="exact", precision="float32"),
                      "fast fp32": dict(impl="fast", precision="float32")})
    ttts = {name: LocalTTT(head, dataclasses.replace(base, **kw),
                           device="cpu" if name == "reference" else args.device).fit(x_tr, y_tr)
            for name, kw in kinds.items()}
    for name, ttt in ttts.items():
        record = ttt.precision_
        print(f"  {name:10s} precision {record['precision']}: {record['reason']}")
    return ttts


# -- measuring ----------------------------------------------------------------------------------------------
def process_seconds(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far (``/proc``; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_rounds(modes: dict, sizes: dict, rounds: int, helper_pid: int) -> tuple[dict, dict, list]:
    """Each round runs every mode on its next chunk; returns per-mode predictions, per-round ms/query, and
    ``[loads at each round's end, CPU cores used by other processes, per-round CPU ms/query of this process]``."""
    preds = {m: [] for m in modes}
    ms = {m: [] for m in modes}
    cpu = {m: [] for m in modes}
    loads = []
    ours = time.process_time() + process_seconds(helper_pid)           # this process and its loop process
    busy, wall = busy_jiffies(), time.perf_counter()
    for r in range(rounds):
        for name, run in modes.items():
            edges = np.linspace(0, sizes[name], rounds + 1).astype(int)
            rows = np.arange(edges[r], edges[r + 1])
            start, cpu_start = time.perf_counter(), time.process_time()
            out = run(rows)
            ms[name].append(1e3 * (time.perf_counter() - start) / max(len(rows), 1))
            if isinstance(out, tuple):                        # a process of its own: its CPU time
                out, cpu_ms = out
            else:
                cpu_ms = 1e3 * (time.process_time() - cpu_start)
            preds[name].append(out)
            cpu[name].append(cpu_ms / max(len(rows), 1))
        loads.append(os.getloadavg()[0])
        print(f"  round {r + 1}/{rounds}: load {loads[-1]:.2f}; " +
              ", ".join(f"{m} {v[-1]:.2f}" for m, v in ms.items()), flush=True)
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    elapsed = time.perf_counter() - wall
    others = ((busy_jiffies() - busy) / ticks - (time.process_time() + process_seconds(helper_pid) - ours)) / elapsed
    return {m: np.concatenate(p) for m, p in preds.items()}, ms, [loads, max(others, 0.0), cpu]


OTHERS_LIMIT = 0.5
"""Cores' worth of CPU time other processes may take during the rounds before the run counts as loaded."""


def fmt(m: dict) -> str:
    return f"{100 * m['value']:.2f} ± {100 * m['se']:.2f}"


def report(preds: dict, ms: dict, loads: list, y: np.ndarray, baselines: dict, threads: int,
           allow_loaded: bool) -> None:
    load, others, cpu = loads
    cores = os.cpu_count() or 1
    measured = os.path.exists("/proc/stat")
    # Spinning threads of this benchmark count in the load average: where the CPU time of other processes can be
    # measured, that decides; elsewhere the load average.
    loaded = others > OTHERS_LIMIT if measured else max(load) > cores
    print(f"load average (1 min) over the rounds: {min(load):.2f}–{max(load):.2f} (mean {np.mean(load):.2f}) on "
          f"{cores} cores, with this benchmark's {threads} threads; CPU used by other processes: {others:.2f} cores"
          + (f" (the run counts as loaded above {OTHERS_LIMIT})" if measured else " (not measurable here: the load average decides)"))
    t = y
    print(f"accuracy (%) on {len(t)} queries: "
          + ", ".join(f"{k} {fmt(accuracy(v == t))}" for k, v in baselines.items()))
    loop = preds["loop"]
    print(f"{'mode':10s} {'ms/query':>9s} {'range':>17s} {'ratio':>7s} {'ratio range':>15s}  {'CPU ms/q':>8s}  "
          f"{'agree with loop':>16s}  {'accuracy %':>13s}  {'minus loop (points)':>19s}")
    for name, times in ms.items():
        m = min(len(preds[name]), len(loop))
        ratios = [a / b for a, b in zip(ms["loop"], times)]
        same = accuracy(preds[name][:m] == loop[:m])
        diff = paired_difference(preds[name][:m] == t[:m], loop[:m] == t[:m])
        if loaded and not allow_loaded:
            ratio = f"{'withheld':>7s} {'':>15s}"
        else:
            mark = " LOADED" if loaded else ""
            ratio = f"{np.median(ratios):6.1f}x {min(ratios):6.1f}–{max(ratios):6.1f}x{mark}"
        print(f"{name:10s} {np.median(times):9.2f} {min(times):8.2f}–{max(times):8.2f} {ratio}  "
              f"{np.median(cpu[name]):8.2f}  "
              f"{100 * same['value']:7.2f}% (n={m:4d})  {fmt(accuracy(preds[name] == t[:len(preds[name])])):>13s}  "
              f"{100 * diff['value']:+8.2f} ± {100 * diff['se']:.2f}")
    if loaded:
        print("LOADED: other processes used the cores during the run; "
              + ("the ratios above measure the load as much as the code" if allow_loaded else
                 "ratios withheld (--allow-loaded prints them marked)"))


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    describe_machine()
    spec = SparseTopics(n=args.n_train + args.n_test, dim=512, n_concepts=4096, n_classes=1000, n_topics=300,
                        topic_size=6, n_private=2, private_scale=0.5, value_law="exponential", seed=args.seed)
    x, y, _ = sparse_topics(spec)
    x_tr, y_tr, x_te, y_te = x[:args.n_train], y[:args.n_train], x[args.n_train:], y[args.n_train:]
    start = time.perf_counter()
    head = train_head(x_tr, y_tr, HeadConfig(epochs=args.head_epochs, lr=3e-3, batch_size=500, seed=args.seed),
                      n_outputs=1000)
    print(f"data: {dataclasses.asdict(spec)}\nglobal head trained in {time.perf_counter() - start:.0f} s")
    ttts = build_modes(head, x_tr, y_tr, args)
    start = time.perf_counter()
    nb = ttts["fast"].neighbours(x_te)
    print(f"neighbour search (batched, timed apart): {1e3 * (time.perf_counter() - start) / len(x_te):.3f} ms/query")
    n_slow = min(args.n_slow, args.n_test)
    folder = Path(tempfile.mkdtemp(prefix="bench-ttt-"))
    save_problem(folder, head.last, x_tr, y_tr, x_te[:n_slow], nb[:n_slow], 1e-2, 50)
    loop = LoopProcess(folder, args.threads)
    print(f"loop: the plain per-query loop in a process of its own, {args.threads} threads, "
          f"OMP_WAIT_POLICY={loop.policy}")
    modes = {"loop": loop}
    modes.update({name: (lambda rows, t=ttt: t.predict(x_te[rows], neighbours=nb[rows]).predictions)
                  for name, ttt in ttts.items()})
    sizes = {name: args.n_test if name.startswith("fast") else n_slow for name in modes}
    print(f"interleaved: {args.rounds} rounds; per mode ms/query (fast rows on {args.n_test} queries, the others "
          f"on the first {n_slow})")
    try:
        preds, ms, loads = run_rounds(modes, sizes, args.rounds, loop.proc.pid)
    finally:
        loop.close()
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    baselines = {"global head": predict_head(head, x_te), "kNN majority": ttts["fast"].knn_baseline(nb)}
    report(preds, ms, loads, y_te, baselines, args.threads, args.allow_loaded)


if __name__ == "__main__":
    main()
