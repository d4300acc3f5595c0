"""One SAE training step (forward, FVU + AuxK on dead latents, backward, Adam step), ours against peers.

Rows, all on the same data in the same process:
  ours fp32       TopKSAE "topk" (sparse encoder backward, embedding_bag decode), precision "fp32"
  ours bf16       the same step with precision "bf16": the latents chosen through a bf16 filter with exact fp32
                  re-ranking (the same latents and values as fp32), the AuxK matmuls in bf16
  ours autocast   the fp32 model under torch.autocast(bfloat16)
  reference       the dense twin (sae/reference.py): dense code, dense decode, ordinary autograd
  sparsify        EleutherAI eai-sparsify SparseCoder (its CPU path: embedding_bag decode), fp32
  overcomplete    overcomplete TopKSAE with its top_k_auxiliary_loss, fp32
  floor           the encoder matmul plus top-k alone (no autograd, no decode, no optimizer)

Peers come from the ``bench`` extra (``pip install -e ".[bench]"`` in a separate venv); a row whose import
fails prints "skipped: <reason>".

    python benchmarks/bench_sae_step.py [--batch 4096 --d 512 --n-latents 4096 --k 16 --repeats 7]
    python benchmarks/bench_sae_step.py --co-runner 2     # beside another job's 2 busy matmul threads

``--co-runner T`` starts a separate process that multiplies 1024x1024 matrices on T threads for the whole
measurement (warm-up included), to show how each step degrades when the cores are shared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's Triton decoder is GPU-only
POLICY_GIVEN = os.environ.get("OMP_WAIT_POLICY")

import artifacts.threads  # noqa: E402,F401  (as every entry point of the toolkit: PASSIVE unless given, before torch)
import torch  # noqa: E402

from sae.config import SAEConfig  # noqa: E402
from sae.model import TopKSAE  # noqa: E402
from sae.precision import NATIVE_BF16_FLAGS, choose_precision, cpu_flags  # noqa: E402
from sae.reference import DenseTopKSAE  # noqa: E402

from machine import cpu_model, load_average  # noqa: E402  (this folder, first on the path of a script)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


CO_RUNNER = (
    "import torch, sys; torch.set_num_threads(int(sys.argv[1])); a = torch.randn(1024, 1024)\n"
    "while True: a @ a"
)


def start_co_runner(n_threads: int) -> subprocess.Popen | None:
    """A busy process beside the benchmark (killed at exit): n_threads of back-to-back fp32 matmuls."""
    if n_threads <= 0:
        return None
    env = {**os.environ, "OMP_NUM_THREADS": str(n_threads)}
    proc = subprocess.Popen([sys.executable, "-c", CO_RUNNER, str(n_threads)], env=env)
    time.sleep(2.0)  # let it import torch and reach its loop
    return proc


def make_adam(params):
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=1e-4, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=1e-4, foreach=True)


# --------------------------------------------------------------------------------------------- steps
def our_step_factory(args, x, dead, x_var, device, precision="fp32", autocast=False, dense=False):
    config = SAEConfig(args.d, args.n_latents, args.k)
    cls = DenseTopKSAE if dense else TopKSAE
    model = cls(config).to(device)
    model.precision = precision
    opt = make_adam(model.parameters())

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(x, dead_mask=dead, x_var=x_var)
        out.loss.backward()
        model.remove_parallel_grad_()
        opt.step()
        model.normalize_decoder_()
        return out

    step.model = model
    return step


def sparsify_step_factory(args, x, dead, x_var, device):
    from sparsify import SparseCoder, SparseCoderConfig

    model = SparseCoder(args.d, SparseCoderConfig(num_latents=args.n_latents, k=args.k), device=device)
    opt = make_adam(model.parameters())
    total_variance = x_var * x.shape[0]

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(x, dead_mask=dead, total_variance=total_variance)
        loss = out.fvu + out.auxk_loss / 32.0
        loss.backward()
        model.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        model.set_decoder_norm_to_unit_norm()
        return out

    return step


def overcomplete_step_factory(args, x, dead, x_var, device):
    from overcomplete.sae import TopKSAE as OTopKSAE
    from overcomplete.sae.losses import top_k_auxiliary_loss

    model = OTopKSAE(args.d, nb_concepts=args.n_latents, top_k=args.k, device=str(device))
    opt = make_adam(model.parameters())

    def step():
        opt.zero_grad(set_to_none=True)
        pre_codes, codes, x_hat = model(x)
        loss = top_k_auxiliary_loss(x, x_hat, pre_codes, codes, model.get_dictionary())
        loss.backward()
        opt.step()
        return loss

    return step


def floor_factory(args, x, dead, x_var, device):
    W = torch.randn(args.d, args.n_latents, device=device) / args.d**0.5

    def step():
        # The bare minimum of any top-k SAE step: one (b, d) x (d, n) matmul, no bias, and top-k.
        with torch.no_grad():
            return torch.topk(x @ W, args.k, dim=1)

    return step


# --------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--n-latents", type=int, default=4096)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--dead-fraction", type=float, default=0.1, help="latents marked dead (AuxK active)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--only", default=None, help="comma-separated row-name prefixes to run (e.g. ours,floor)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--co-runner", type=int, default=0, help="threads of a busy job run beside (0: none)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time each step by this thread's CPU time (with --threads 1): a proxy for the work "
                             "that time slices taken by other jobs do not inflate")
    args = parser.parse_args()
    co_runner = start_co_runner(args.co_runner)
    try:
        run(args)
    finally:
        if co_runner is not None:
            co_runner.kill()
            co_runner.wait()


def run(args) -> None:
    if args.cpu_time and args.threads != 1:
        raise SystemExit("--cpu-time measures one thread's CPU time: pass --threads 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    x = torch.randn(args.batch, args.d, device=device)
    x = x / x.norm(dim=1, keepdim=True)  # CLIP-like unit-norm embeddings
    dead = torch.rand(args.n_latents, device=device) < args.dead_fraction
    x_var = float((x - x.mean(0)).pow(2).sum(1).mean())
    print_header(args, device, x, dead)
    rows = build_rows(args, x, dead, x_var, device)
    steps = {name: fn for name, fn in rows.items() if callable(fn)}
    times = measure(steps, args, device)
    print_results(args, rows, times)


def print_header(args, device: torch.device, x: torch.Tensor, dead: torch.Tensor) -> None:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    origin = "from the environment" if POLICY_GIVEN else "the toolkit's default"
    print(f"machine: {cpu_model()}; load average {load_average()}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} ({origin}, for every row)")
    print(
        f"device={device} cpu_count={os.cpu_count()} usable_cpus={affinity} torch_threads={torch.get_num_threads()} "
        f"torch={torch.__version__} cpu_capability={torch.backends.cpu.get_cpu_capability()} "
        f"bf16_native_flags={sorted(cpu_flags() & set(NATIVE_BF16_FLAGS)) or 'none'} co_runner_threads={args.co_runner}"
    )
    if device.type == "cuda":
        print(f"gpu={torch.cuda.get_device_name(device)}")
    print(
        f"step: batch={args.batch} d={args.d} n_latents={args.n_latents} k={args.k} dead={int(dead.sum())} "
        f"latents (AuxK active), Adam, warm-up {args.warmup}, median of {args.repeats}"
    )
    model = TopKSAE(SAEConfig(args.d, args.n_latents, args.k)).to(device)
    record = choose_precision("auto", model, x, args.batch, args.k)
    print(f"precision auto would choose: {record['precision']} ({record['reason']})")


def build_rows(args, x, dead, x_var, device) -> dict[str, object]:
    """Each row's step function, or the reason it is skipped."""
    rows: dict[str, object] = {}
    factories = [
        ("ours fp32", lambda: our_step_factory(args, x, dead, x_var, device)),
        ("ours bf16", lambda: our_step_factory(args, x, dead, x_var, device, precision="bf16")),
        ("ours fp32 under bf16 autocast", lambda: our_step_factory(args, x, dead, x_var, device, autocast=True)),
        ("reference (dense twin) fp32", lambda: our_step_factory(args, x, dead, x_var, device, dense=True)),
        ("sparsify SparseCoder fp32", lambda: sparsify_step_factory(args, x, dead, x_var, device)),
        ("overcomplete TopKSAE fp32", lambda: overcomplete_step_factory(args, x, dead, x_var, device)),
        ("floor: matmul + top-k", lambda: floor_factory(args, x, dead, x_var, device)),
    ]
    for name, factory in factories:
        if args.only and not any(name.startswith(p) for p in args.only.split(",")):
            continue
        if args.skip_reference and name.startswith("reference"):
            rows[name] = "skipped: --skip-reference"
            continue
        try:
            rows[name] = factory()
        except Exception as e:  # a peer that fails to import or build is reported, not fatal
            rows[name] = f"skipped: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return rows


def measure(steps: dict, args, device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of every row, the rows interleaved so that a change in machine load hits all alike."""
    for fn in steps.values():
        for _ in range(args.warmup):
            fn()
        sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    clock = time.thread_time if args.cpu_time else time.perf_counter
    for _ in range(args.repeats):
        for name, fn in steps.items():
            sync(device)
            t0 = clock()
            fn()
            sync(device)
            times[name].append(clock() - t0)
    return times


def print_results(args, rows: dict, times: dict[str, list[float]]) -> None:
    ms = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
    clock = "CPU ms/step (one thread)" if args.cpu_time else "ms/step"
    print(f"{'row':32s} {clock:>10s} {'min':>8s} {'max':>8s} {'samples/s':>12s}")
    for name, value in rows.items():
        if name in ms:
            lo, hi = 1e3 * min(times[name]), 1e3 * max(times[name])
            print(f"{name:32s} {ms[name]:10.1f} {lo:8.1f} {hi:8.1f} {args.batch / ms[name] * 1e3:12.0f}")
        else:
            print(f"{name:32s} {value}")
    bf16 = rows.get("ours bf16")
    if callable(bf16):
        print(f"bf16 filter: exact fp32 pre-activations per row on the last step: {bf16.model.last_exact_per_row:.1f} "
              f"(k={args.k})")

    def ratio(a: str, b: str, label: str) -> None:
        if a in ms and b in ms:
            print(f"{label:52s} {ms[b] / ms[a]:6.2f}x")

    print("ratios (throughput):")
    ratio("ours fp32", "reference (dense twin) fp32", "ours fp32 vs reference twin")
    ratio("ours fp32", "sparsify SparseCoder fp32", "ours fp32 vs sparsify fp32 (target >= 3.5x)")
    ratio("ours fp32", "overcomplete TopKSAE fp32", "ours fp32 vs overcomplete fp32")
    ratio("ours bf16", "sparsify SparseCoder fp32", "ours bf16 vs sparsify fp32 (target >= 5x)")
    ratio("ours fp32 under bf16 autocast", "sparsify SparseCoder fp32", "ours under autocast vs sparsify fp32")
    ratio("ours bf16", "ours fp32", "ours bf16 vs ours fp32")
    floor = "floor: matmul + top-k"
    for name in ("ours fp32", "ours bf16"):
        if name in ms and floor in ms:
            target = " (target <= 1.3x)" if name == "ours fp32" else ""
            print(f"{name + ' time / floor time' + target:52s} {ms[name] / ms[floor]:6.2f}x")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
