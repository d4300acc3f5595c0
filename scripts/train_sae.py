"""Train a top-k sparse autoencoder on an EmbeddingStore.

    python scripts/train_sae.py --store STORE_DIR --out SAE_DIR [--n-latents N | --expansion E] [--k K]
                                [--steps S | --epochs E] [--batch-size B] [--lr LR] [--variant topk|paper]
                                [--device cpu|cuda] [--bf16] [--resume] [--overwrite] ...

Multi-process: ``torchrun --nproc_per_node=N scripts/train_sae.py ...`` (same flags; the global batch is
split across processes). After an interruption, run the same command with ``--resume``; a finished run
rerun with ``--resume`` reports the complete SAE (when its settings match) and clears any leftovers. The store
is checked against its recorded content hash first (``--no-verify`` skips that on huge stores).
"""

from __future__ import annotations

import argparse
import json
import os

import artifacts.threads  # noqa: F401  (sleeping OpenMP threads; set before torch loads)
import torch  # noqa: E402

from analysis.run.store_stages import sae_config_for_store, train_sae_on_store
from artifacts.cli import run_main
from embeddings.store import EmbeddingStore
from sae.batches import choose_rows
from sae.train import RunConfig, TrainConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="EmbeddingStore directory (scripts/extract.py)")
    p.add_argument("--out", required=True, help="SAE directory to write")
    width = p.add_mutually_exclusive_group()
    width.add_argument("--n-latents", type=int, help="SAE width (default: 8*d, e.g. 4096 for 512-d CLIP, capped for small stores)")
    width.add_argument("--expansion", type=int, help="SAE width as a multiple of d")
    p.add_argument("--k", type=int, help="active latents per input (default: d/32, e.g. 16 for d=512, at least 4)")
    p.add_argument("--variant", choices=("topk", "paper"), default="topk",
                   help="topk: Gao et al. 2024 with AuxK (default); paper: the authors' model")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=float, help="passes over the training rows (default: 100)")
    p.add_argument("--batch-size", type=int, help="global batch size (default: 4096, smaller for small stores)")
    p.add_argument("--lr", type=float, default=TrainConfig.lr, help="peak learning rate")
    p.add_argument("--lr-warmup-steps", type=int, help="LR warm-up steps (default: min(5000, steps/6))")
    p.add_argument("--lr-decay", choices=("linear", "cosine", "none"), default=TrainConfig.lr_decay)
    p.add_argument("--k-start", type=int, help="k at the start of annealing (default: min(8k, n_latents))")
    p.add_argument("--k-anneal-steps", type=int, help="steps of k annealing (default: min(10000, steps/3))")
    p.add_argument("--dead-window", type=int, help="samples without firing after which a latent is dead (topk)")
    p.add_argument("--dead-threshold", type=float, default=TrainConfig.dead_threshold,
                   help="paper variant: dead while the cumulative firing frequency is below this")
    p.add_argument("--grad-clip", type=float, default=TrainConfig.grad_clip, help="max gradient norm (0: off)")
    p.add_argument("--bias-init", choices=("geometric_median", "mean"), default=TrainConfig.bias_init)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--split", help="training split of the store (default: 'train' if present, else all rows)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--checkpoint-every", type=int, default=RunConfig.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--log-every", type=int, default=RunConfig.log_every, help="steps between history records")
    p.add_argument("--val-every", type=int, default=0, help="held-out evaluation every this many steps (0: never)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="discard a checkpoint and replace an existing --out (only ever an artifact of this toolkit)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the content-hash check of --store (huge stores; the cheap size checks still run)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    store = EmbeddingStore.open(args.store)
    config = TrainConfig(
        batch_size=args.batch_size, lr=args.lr, n_steps=args.steps, n_epochs=args.epochs,
        lr_warmup_steps=args.lr_warmup_steps, lr_decay=args.lr_decay, k_start=args.k_start,
        k_anneal_steps=args.k_anneal_steps, dead_window_samples=args.dead_window,
        dead_threshold=args.dead_threshold, grad_clip=args.grad_clip,
        bias_init=args.bias_init, seed=args.seed, bf16=args.bf16,
    )
    run = RunConfig(
        device=args.device, checkpoint_every=args.checkpoint_every, log_every=args.log_every,
        progress=not args.no_progress, n_threads=args.threads, val_every=args.val_every,
    )
    train_rows, _, _ = choose_rows(store.n, store.split, args.split, seed=args.seed)
    sae_config = sae_config_for_store(
        store.d, train_rows.size, n_latents=args.n_latents, expansion=args.expansion, k=args.k,
        variant=args.variant,
    )
    result, heldout_name = train_sae_on_store(
        store, args.out, sae_config, config, run, split=args.split, resume=args.resume,
        overwrite=args.overwrite, verify_store=not args.no_verify,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        if result.already_complete:
            print(f"{result.out_dir} is already complete (same settings): nothing to train; leftovers removed")
        else:
            shape = f"{sae_config.n_latents} latents, k={sae_config.k}, {sae_config.variant}"
            print(f"SAE ({shape}) written to {result.out_dir}")
        print(f"trained on {train_rows.size} rows; held-out metrics on {heldout_name}:")
        heldout = {k: v for k, v in result.metrics.get("heldout", {}).items() if not isinstance(v, dict)}
        print(json.dumps({"heldout": heldout, "train": result.metrics.get("train", {})}, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    run_main(main)
