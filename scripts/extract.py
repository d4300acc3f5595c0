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
from dataclasses import fields

from artifacts.cli import run_main
from artifacts.flags import SETTINGS_FILE, add_config_file_flag, add_config_flags, parse_args, write_settings

def parser() -> argparse.ArgumentParser:
    from embeddings.extract_config import ExtractConfig, ExtractRun

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, ExtractConfig, defaults={"source": "digits", "backbone": None, "weights": None},
                     default_text={"backbone": "digits-cnn for digits, else required",
                                   "weights": "hub, or a trained CNN directory for digits-cnn"})
    add_config_flags(p, ExtractRun, exclude=("out_dir",), names={"n_threads": "threads"},
                     default_text={"num_workers": "from the CPUs and the device", "n_threads": "torch's own"})
    p.add_argument("--out", dest="out_dir", required=True, help="store directory to write")
    add_config_file_flag(p)
    return p


def main(argv=None) -> int:
    args = parse_args(parser(), argv)
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

    config = ExtractConfig(**{f.name: getattr(args, f.name) for f in fields(ExtractConfig)}
                           | {"backbone": backbone, "weights": weights})
    run = ExtractRun(**{f.name: getattr(args, f.name) for f in fields(ExtractRun)})
    store = extract(config, run)
    if int(os.environ.get("RANK", "0")) == 0:
        write_settings(store.store_dir / SETTINGS_FILE, args)  # --config of it extracts again
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
