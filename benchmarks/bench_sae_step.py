"""One SAE training step (forward, FVU + AuxK on dead latents, backward, Adam step), ours against peers.

Rows, all on the same data in the same process:
  ours            TopKSAE "topk" (sparse encoder backward, embedding_bag decode), fp32
  ours bf16       the same step under bf16 autocast
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

import torch  # noqa: E402

from sae.config import SAEConfig  # noqa: E402
from sae.model import TopKSAE  # noqa: E402
from sae.reference import DenseTopKSAE  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


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
def our_step_factory(args, x, dead, x_var, device, bf16=False, dense=False):
    config = SAEConfig(args.d, args.n_latents, args.k)
    cls = DenseTopKSAE if dense else TopKSAE
    model = cls(config).to(device)
    opt = make_adam(model.parameters())

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x, dead_mask=dead, x_var=x_var)
        out.loss.backward()
        model.remove_parallel_grad_()
        opt.step()
        model.normalize_decoder_()
        return out

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
    args = parser.parse_args()
    co_runner = start_co_runner(args.co_runner)
    try:
        run(args)
    finally:
        if co_runner is not None:
            co_runner.kill()
            co_runner.wait()


def run(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    x = torch.randn(args.batch, args.d, device=device)
    x = x / x.norm(dim=1, keepdim=True)  # CLIP-like unit-norm embeddings
    dead = torch.rand(args.n_latents, device=device) < args.dead_fraction
    x_var = float((x - x.mean(0)).pow(2).sum(1).mean())

    flags = cpu_flags()
    bf16_native = sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    print(
        f"device={device} cpu_count={os.cpu_count()} usable_cpus={affinity} torch_threads={torch.get_num_threads()} "
        f"torch={torch.__version__} cpu_capability={torch.backends.cpu.get_cpu_capability()} "
        f"bf16_native_flags={bf16_native or 'none'} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} "
        f"co_runner_threads={args.co_runner}"
    )
    if device.type == "cuda":
        print(f"gpu={torch.cuda.get_device_name(device)}")
    print(
        f"step: batch={args.batch} d={args.d} n_latents={args.n_latents} k={args.k} dead={int(dead.sum())} "
        f"latents (AuxK active), Adam, warm-up {args.warmup}, median of {args.repeats}"
    )

    rows: dict[str, object] = {}
    factories = [
        ("ours fp32", lambda: our_step_factory(args, x, dead, x_var, device)),
        ("ours bf16 autocast", lambda: our_step_factory(args, x, dead, x_var, device, bf16=True)),
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

    steps = {name: fn for name, fn in rows.items() if callable(fn)}
    for name, fn in steps.items():
        for _ in range(args.warmup):
            fn()
        sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    # Interleave the rows so that a change in machine load hits all of them alike.
    for _ in range(args.repeats):
        for name, fn in steps.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)

    ms = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
    print(f"{'row':32s} {'ms/step':>10s} {'samples/s':>12s}")
    for name, value in rows.items():
        if name in ms:
            print(f"{name:32s} {ms[name]:10.1f} {args.batch / ms[name] * 1e3:12.0f}")
        else:
            print(f"{name:32s} {value}")

    def ratio(a: str, b: str, label: str) -> None:
        if a in ms and b in ms:
            print(f"{label:48s} {ms[b] / ms[a]:6.2f}x")

    print("ratios (throughput):")
    ratio("ours fp32", "reference (dense twin) fp32", "ours fp32 vs reference twin")
    ratio("ours fp32", "sparsify SparseCoder fp32", "ours fp32 vs sparsify fp32 (target >= 2.5x)")
    ratio("ours fp32", "overcomplete TopKSAE fp32", "ours fp32 vs overcomplete fp32")
    ratio("ours bf16 autocast", "sparsify SparseCoder fp32", "ours bf16 vs sparsify fp32 (target >= 5x)")
    if "ours fp32" in ms and "floor: matmul + top-k" in ms:
        print(f"{'ours fp32 time / floor time (target <= 2x)':48s} {ms['ours fp32'] / ms['floor: matmul + top-k']:6.2f}x")


if __name__ == "__main__":
    main()
