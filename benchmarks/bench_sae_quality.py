"""SAE quality at equal budget: ours (its defaults, and the paper's fixed-fraction schedule) against eai-sparsify.

Data: a planted sparse dictionary with skewed atom usage. ``n_atoms`` unit-norm random atoms in ``d``
dimensions; every row mixes ``n_active`` distinct atoms, drawn with probability proportional to
``1 / (rank + 1) ** zipf`` (the most used atom is ~``n_atoms ** zipf`` times more frequent than the rarest),
with coefficients uniform in [0.5, 1.5], plus Gaussian noise. All rows see the same shuffled batches
(``sae.batches.BatchStream``, same seed), the same width, k, batch size, learning rate and number of steps.

Rows:
  ours (defaults)        ``train_sae`` with its default schedule (k annealing and LR warm-up resolved for the run)
  ours (paper schedule)  the same with the paper's fixed fractions: k from 8k over a third of the steps,
                         warm-up over a sixth (min 5000 steps), as the defaults were before they adapted
  ours (fp32) / (bf16)   the defaults with the precision forced (``auto`` picks one by speed: at these small
                         sizes fp32 without measuring): bf16 chooses the same latents with exact float32
                         values and runs only the AuxK loss in bfloat16, so quality at equal steps should match
  sparsify               eai-sparsify ``SparseCoder`` trained as its ``Trainer`` does with its defaults (Adam,
                         linear warm-up over 1000 steps then linear decay, b_dec from the first batch's mean,
                         gradient parallel to decoder rows removed, no AuxK, no k decay)

Printed per budget and row: held-out FVU, dead fraction (never fired on the held-out rows), planted recovery
(fraction of atoms whose closest decoder row has cosine >= 0.9) overall and for the rarest quarter of atoms;
each as mean ± standard error over ``--seeds`` seeds (n = seeds).

    python benchmarks/bench_sae_quality.py [--budgets 500,1500,3000 --seeds 3]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's Triton kernels are GPU-only

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sae.batches import BatchStream  # noqa: E402
from sae.checkpoint import load_sae  # noqa: E402
from sae.config import SAEConfig  # noqa: E402
from sae.metrics import evaluate  # noqa: E402
from sae.train import RunConfig, TrainConfig, train_sae  # noqa: E402


def planted_data(n: int, d: int, n_atoms: int, n_active: int, zipf: float, noise: float, seed: int):
    """Rows ``x = c @ atoms + noise``; which atoms a row uses follows a Zipf law (Gumbel top-k sampling)."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    log_p = -zipf * np.log(np.arange(1, n_atoms + 1))
    # n_active distinct atoms per row with P(atom) ~ p: the top n_active of log p + Gumbel noise.
    keys = log_p[None, :] + rng.gumbel(size=(n, n_atoms))
    chosen = np.argpartition(-keys, n_active, axis=1)[:, :n_active]
    coef = rng.uniform(0.5, 1.5, size=(n, n_active))
    x = np.einsum("nk,nkd->nd", coef, atoms[chosen]) + noise * rng.normal(size=(n, d))
    usage = np.bincount(chosen.ravel(), minlength=n_atoms) / n
    return x.astype(np.float32), atoms, usage


def recovery(decoder: np.ndarray, atoms: np.ndarray, usage: np.ndarray) -> tuple[float, float]:
    """Fraction of atoms (all, and the rarest quarter) whose closest unit decoder row has cosine >= 0.9."""
    dec = decoder / np.linalg.norm(decoder, axis=1, keepdims=True).clip(1e-12)
    best = (atoms @ dec.T).max(axis=1)
    rare = np.argsort(usage)[: max(1, len(usage) // 4)]
    return float((best >= 0.9).mean()), float((best[rare] >= 0.9).mean())


def run_ours(args, x, held, steps: int, seed: int, kind: str) -> np.ndarray:
    extra = {}
    if kind == "paper":
        extra = dict(k_anneal_steps=min(10_000, steps // 3), lr_warmup_steps=min(5000, steps // 6))
    if kind in ("fp32", "bf16"):
        extra = dict(precision=kind)
    with tempfile.TemporaryDirectory() as tmp:
        train_sae(
            x, os.path.join(tmp, "sae"), SAEConfig(args.d, args.n_latents, args.k),
            TrainConfig(n_steps=steps, batch_size=args.batch, lr=args.lr, seed=seed, **extra),
            RunConfig(progress=False, checkpoint_every=0, log_every=max(steps, 1)),
            heldout_x=held,
        )
        model = load_sae(os.path.join(tmp, "sae"))
    return model


def run_sparsify(args, x, held, steps: int, seed: int):
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(seed)
    model = SparseCoder(args.d, SparseCoderConfig(num_latents=args.n_latents, k=args.k))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    warmup = 1000  # sparsify's TrainConfig.lr_warmup_steps
    # transformers.get_linear_schedule_with_warmup(warmup, steps), as sparsify's Trainer uses it.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / max(1, warmup) if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup))
    )
    stream = BatchStream(x, args.batch, seed=seed)
    for step in range(steps):
        xb = torch.from_numpy(stream.next_batch().x)
        if step == 0:
            with torch.no_grad():
                model.b_dec.copy_(xb.mean(0))
        total_variance = (xb - xb.mean(0)).pow(2).sum()
        out = model(xb, total_variance=total_variance)
        out.fvu.backward()
        model.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model


def sparsify_metrics(model, held: np.ndarray) -> tuple[float, float]:
    with torch.no_grad():
        xh = torch.from_numpy(held)
        enc = model.encode(xh)
        recon = model.decode(enc.top_acts, enc.top_indices)
        fvu = float((xh - recon).pow(2).sum() / (xh - xh.mean(0)).pow(2).sum())
        fired = torch.zeros(model.num_latents, dtype=torch.bool)
        fired[enc.top_indices[enc.top_acts > 0]] = True
    return fvu, float((~fired).double().mean())


def mean_se(values: list[float]) -> str:
    m = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{m:.4f} ± {se:.4f}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--n-atoms", type=int, default=256)
    parser.add_argument("--n-active", type=int, default=4)
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--noise", type=float, default=0.01)
    parser.add_argument("--n-rows", type=int, default=100_000)
    parser.add_argument("--n-latents", type=int, default=512)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--budgets", default="500,1500,3000", help="comma-separated numbers of steps")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small matrices: 1 is fastest)")
    parser.add_argument("--rows", default=None, help="comma-separated rows to run: ours,paper,fp32,bf16,sparsify")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.budgets.split(",")]

    x_all, atoms, usage = planted_data(
        args.n_rows + 10_000, args.d, args.n_atoms, args.n_active, args.zipf, args.noise, seed=1234
    )
    x, held = x_all[: args.n_rows], x_all[args.n_rows :]
    print(
        f"data: {args.n_rows} rows (+10000 held out), d={args.d}, {args.n_atoms} planted atoms, {args.n_active} "
        f"per row, Zipf {args.zipf} usage (most/least used atom: {usage.max():.4f}/{usage.min():.5f} of rows), "
        f"noise {args.noise}"
    )
    print(
        f"all rows: n_latents={args.n_latents} k={args.k} batch={args.batch} lr={args.lr}; torch {torch.__version__}, "
        f"{args.threads} thread(s); mean ± standard error over n={args.seeds} seeds"
    )
    try:
        import sparsify  # noqa: F401

        have_sparsify = None
    except ImportError as e:
        have_sparsify = f"skipped: sparsify is not installed ({e}); pip install -e '.[bench]' in a separate venv"
    rows = [("ours (defaults)", "ours"), ("ours (paper schedule)", "paper"), ("ours (fp32)", "fp32"),
            ("ours (bf16)", "bf16"), ("sparsify SparseCoder", "sparsify")]
    if args.rows:
        rows = [r for r in rows if r[1] in args.rows.split(",")]
    print(f"{'steps':>6s} {'row':24s} {'held-out FVU':>17s} {'dead fraction':>17s} {'recovered (cos>=.9)':>20s} "
          f"{'rarest quarter':>17s} {'s/run':>6s}")
    for steps in budgets:
        for label, kind in rows:
            if kind == "sparsify" and have_sparsify:
                print(f"{steps:6d} {label:24s} {have_sparsify}")
                continue
            fvus, deads, recs, rares, secs = [], [], [], [], []
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                if kind == "sparsify":
                    model = run_sparsify(args, x, held, steps, seed)
                    fvu, dead = sparsify_metrics(model, held)
                    decoder = model.W_dec.detach().numpy()
                else:
                    model = run_ours(args, x, held, steps, seed, kind)
                    metrics = evaluate(model, held)
                    fvu, dead = metrics["fvu"], metrics["dead_fraction"]
                    decoder = model.decoder_weight().detach().numpy()
                secs.append(time.perf_counter() - t0)
                rec, rare = recovery(decoder, atoms, usage)
                fvus.append(fvu), deads.append(dead), recs.append(rec), rares.append(rare)
            print(f"{steps:6d} {label:24s} {mean_se(fvus):>17s} {mean_se(deads):>17s} {mean_se(recs):>20s} "
                  f"{mean_se(rares):>17s} {statistics.fmean(secs):6.1f}")


if __name__ == "__main__":
    main()
