"""Import an SAE saved by SAELens (architecture "topk") or EleutherAI sparsify into an SAE directory.

    python scripts/import_sae.py --from SAELENS_OR_SPARSIFY_DIR --out SAE_DIR [--format saelens|sparsify]

The layout is recognised by its weight file (``sae_weights.safetensors`` or ``sae.safetensors``, each with
``cfg.json``). Every field of ``cfg.json`` is honoured: mapped to ours, folded into the weights where that is
exact (SAELens's rescale_acts_by_decoder_norm, its activation normalisation of a checkpoint saved during training),
or refused by name (other architectures, per-input normalisation, skip connections, transcoders, fields this
importer does not know); the README lists each. Provenance and firing frequencies (``sparsity.safetensors``)
come along. One of our own SAE directories, or a sparsify run folder, is named as such.
The authors' SAE of the paper has its own importer: scripts/import_paper_sae.py.
"""

from __future__ import annotations

import argparse

from artifacts.cli import run_main
from sae.interop import FORMATS, import_foreign_sae


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="src", required=True, help="SAELens or sparsify directory")
    p.add_argument("--out", required=True, help="SAE directory to write (SAE_DIR)")
    p.add_argument("--format", choices=FORMATS, default=None, help="layout of --from (default: recognised)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing SAE_DIR (default: off)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    sae_dir = import_foreign_sae(args.src, args.out, args.format, overwrite=args.overwrite)
    print(f"imported {args.src} into {sae_dir}")
    return 0


if __name__ == "__main__":
    run_main(main)
