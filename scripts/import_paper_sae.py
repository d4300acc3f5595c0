"""Import the authors' released top-k SAE into an SAE directory (the "paper" variant).

    python scripts/import_paper_sae.py --checkpoint clip_sae_checkpoint.pt --out SAE_DIR
    python scripts/import_paper_sae.py --checkpoint HF_SNAPSHOT_DIR --out SAE_DIR
    python scripts/import_paper_sae.py --checkpoint patrikwolf/clip-topk-sae --out SAE_DIR   # local HF cache
    python scripts/import_paper_sae.py --checkpoint ~/.cache/huggingface/hub/models--patrikwolf--clip-topk-sae --out SAE_DIR

The torch file is read with ``torch.load(weights_only=True)`` only; a Hugging Face snapshot directory of
``patrikwolf/clip-topk-sae`` (config.json + model.safetensors) works too, named by its folder, by its hub
id (resolved in the local Hugging Face cache only: HF_HUB_CACHE / HF_HOME; nothing is downloaded, and the
error says how to download it when it is not cached) or by its cache folder ``models--patrikwolf--clip-topk-sae``.
"""

from __future__ import annotations

import argparse

from artifacts.cli import run_main
from sae.checkpoint import import_paper_checkpoint


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the authors' .pt file, a hub snapshot directory, a hub id "
                   "(patrikwolf/clip-topk-sae) or a hub cache folder (models--OWNER--NAME)")
    p.add_argument("--out", required=True, help="SAE directory to write (SAE_DIR)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing SAE_DIR, an artifact of this toolkit (default: off)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    sae_dir = import_paper_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"imported the authors' SAE into {sae_dir}")
    return 0


if __name__ == "__main__":
    run_main(main)
