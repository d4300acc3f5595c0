"""Import the authors' released top-k SAE into an SAE directory (the "paper" variant).

    python scripts/import_paper_sae.py --checkpoint clip_sae_checkpoint.pt --out SAE_DIR
    python scripts/import_paper_sae.py --checkpoint HF_SNAPSHOT_DIR --out SAE_DIR

The torch file is read with ``torch.load(weights_only=True)`` only; a Hugging Face snapshot directory of
``patrikwolf/clip-topk-sae`` (config.json + model.safetensors) works too.
"""

from __future__ import annotations

import argparse
import sys

from artifacts import ArtifactError
from sae.checkpoint import import_paper_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the authors' .pt file or a hub snapshot directory")
    parser.add_argument("--out", required=True, help="SAE directory to write (SAE_DIR)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing SAE_DIR")
    args = parser.parse_args(argv)
    try:
        sae_dir = import_paper_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)
    except (ArtifactError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"imported the authors' SAE into {sae_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
