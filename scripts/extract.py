"""Extract frozen backbone embeddings of an image collection into an EmbeddingStore.

    python scripts/extract.py --source digits --weights CNN_DIR --out runs/digits/store
    python scripts/extract.py --source /data/imagenet/val --backbone vit_base_patch16_clip_224.openai --out STORE_DIR
    torchrun --nproc_per_node=4 scripts/extract.py --source DIR --backbone resnet50 --device cuda --out STORE_DIR

Killed runs resume when the same command is run again.
"""

from __future__ import annotations

import argparse
import logging
import os

from artifacts.cli import run_main

DTYPES = ("float32", "float16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="digits", help="digits, an image folder, or a .txt/.csv file list")
    p.add_argument("--kind", default="auto", help="how to read --source (default: guessed)")
    p.add_argument("--backbone", default=None, help="digits-cnn or a timm model name (default: digits-cnn for digits)")
    p.add_argument("--weights", default=None, help="hub, random, or a local weights file / trained CNN directory")
    p.add_argument("--output", default="auto", choices=["auto", "head", "pre_logits"])
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="L2-normalise embeddings (default: the backbone's own choice, on for CLIP)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the source's split")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="share of each label held out as val (default: digits 0.2, folders and lists no split)")
    p.add_argument("--test-fraction", type=float, default=None, help="share of each label held out as test")
    p.add_argument("--out", required=True, help="store directory to write")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--num-workers", type=int, default=None,
                   help="decode worker processes; 0: decode in this process on threads (default: from CPUs and device)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the forward pass")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward pass")
    p.add_argument("--chunk-size", type=int, default=1024, help="rows per resumable chunk (a multiple of --batch-size)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a different store at --out (only ever an artifact of this toolkit), or a partial "
                        "extraction made with other settings")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    backbone = args.backbone
    if backbone is None:
        if args.source != "digits":
            raise ValueError("--backbone is required for image folders and file lists (e.g. --backbone resnet50)")
        backbone = "digits-cnn"
    weights = args.weights
    if weights is None:
        if backbone == "digits-cnn":
            raise ValueError(
                "the digits CNN needs trained weights: run `python scripts/train_backbone.py --out CNN_DIR` first "
                "and pass --weights CNN_DIR (or pass --weights random for an untrained CNN)"
            )
        weights = "hub"
    # Imported after the argument checks, so that a usage error answers at once, without loading torch.
    from embeddings.extract import ExtractConfig, ExtractRun, extract

    config = ExtractConfig(
        source=args.source, kind=args.kind, backbone=backbone, weights=weights, output=args.output,
        normalize=args.normalize, dtype=args.dtype, batch_size=args.batch_size, seed=args.seed,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction,
    )
    run = ExtractRun(
        out_dir=args.out, device=args.device, num_workers=args.num_workers, bf16=args.bf16,
        chunk_size=args.chunk_size, overwrite=args.overwrite, n_threads=args.threads, progress=not args.no_progress,
    )
    store = extract(config, run)
    if int(os.environ.get("RANK", "0")) == 0:
        rate = store.meta.get("images_per_s")
        print(f"store: {store.store_dir}")
        print(
            f"n={store.n} d={store.d} dtype={store.x.dtype} backbone={store.meta.get('backbone')} "
            f"skipped={len(store.skipped)}" + (f" (listed in {store.store_dir / 'skipped.json'})" if store.skipped else "")
            + (f" {rate:.1f} images/s" if rate else "") + f" content_hash={store.content_hash[:12]}"
        )
    return 0


if __name__ == "__main__":
    run_main(main)
