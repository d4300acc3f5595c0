"""Import an SAE saved by SAELens (architecture "topk") or EleutherAI sparsify into an SAE directory.

    python scripts/import_sae.py --from SAELENS_OR_SPARSIFY_DIR --out SAE_DIR [--format saelens|sparsify]

The layout is recognised by its weight file (``sae_weights.safetensors`` or ``sae.safetensors``, each with
``cfg.json``); other architectures, activation normalisations, skip connections and transcoders are refused.
The authors' SAE of the paper has its own importer: scripts/import_paper_sae.py.
"""

from __future__ import annotations

import argparse

from artifacts.cli import run_main
from sae.interop import FORMATS, import_foreign_sae


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="src", required=True, help="SAELens or sparsify directory")
    parser.add_argument("--out", required=True, help="SAE directory to write (SAE_DIR)")
    parser.add_argument("--format", choices=FORMATS, default=None, help="layout of --from (default: recognised)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing SAE_DIR")
    args = parser.parse_args(argv)
    sae_dir = import_foreign_sae(args.src, args.out, args.format, overwrite=args.overwrite)
    print(f"imported {args.src} into {sae_dir}")
    return 0


if __name__ == "__main__":
    run_main(main)
