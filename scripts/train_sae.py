"""Train a top-k sparse autoencoder on an EmbeddingStore.

    python scripts/train_sae.py --store STORE_DIR --out SAE_DIR [--n-latents N | --expansion E] [--k K]
                                [--steps S | --epochs E] [--batch-size B] [--lr LR] [--variant topk|paper]
                                [--device cpu|cuda] [--precision auto|fp32|bf16] [--resume] [--overwrite] ...

Multi-process: ``torchrun --nproc_per_node=N scripts/train_sae.py ...`` (same flags; the global batch is
split across processes). After an interruption, run the same command with ``--resume``; a finished run
rerun with ``--resume`` reports the complete SAE (when its settings match) and clears any leftovers. The store
is checked against its recorded content hash first (``--no-verify`` skips that on huge stores).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import fields
from pathlib import Path

import artifacts.threads  # noqa: F401  (sleeping OpenMP threads; set before torch loads)
import torch  # noqa: E402

from analysis.run.store_stages import sae_config_for_store, train_sae_on_store
from artifacts.cli import run_main
from artifacts.flags import SETTINGS_FILE, add_config_file_flag, add_config_flags, parse_args, write_settings
from embeddings.store import EmbeddingStore
from sae.batches import choose_rows
from sae.train import RunConfig, TrainConfig


TRAIN_NAMES = {"n_steps": "steps", "n_epochs": "epochs", "dead_window_samples": "dead_window"}
RUN_NAMES = {"n_threads": "threads"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="EmbeddingStore directory (scripts/extract.py)")
    p.add_argument("--out", required=True, help="SAE directory to write")
    p.add_argument("--n-latents", type=int, help="SAE width (default: 8*d, e.g. 4096 for 512-d CLIP, capped for "
                                                  "small stores)")
    p.add_argument("--expansion", type=int, help="SAE width as a multiple of d, instead of --n-latents (default: none)")
    p.add_argument("--k", type=int, help="active latents per input (default: d/32, e.g. 16 for d=512, at least 4)")
    p.add_argument("--variant", choices=("topk", "paper"), default="topk",
                   help="topk: Gao et al. 2024 with AuxK; paper: the authors' model (default: topk)")
    add_config_flags(p, TrainConfig, names=TRAIN_NAMES)
    add_config_flags(p, RunConfig, names=RUN_NAMES, defaults={"device": "cuda" if torch.cuda.is_available() else "cpu"},
                     default_text={"device": "cuda when present, else cpu"})
    p.add_argument("--split", help="training split of the store (default: 'train' if present, else all rows)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint (default: off)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard a checkpoint and replace an existing --out, only ever an artifact of this toolkit "
                        "(default: off)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the content-hash check of --store (huge stores; the cheap size checks still run) "
                        "(default: off)")
    add_config_file_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(parser(), argv)
    store = EmbeddingStore.open(args.store)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    run = RunConfig(**{f.name: getattr(args, f.name) for f in fields(RunConfig)})
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
        write_settings(Path(result.out_dir) / SETTINGS_FILE, args)  # --config of it trains this SAE again
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
