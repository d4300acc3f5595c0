"""Write an SAE directory in the layout of SAELens or EleutherAI sparsify (neither library is needed).

    python scripts/export_sae.py --sae SAE_DIR --format saelens --out OUT_DIR
    python scripts/export_sae.py --sae SAE_DIR --format sparsify --out OUT_DIR
    python scripts/export_sae.py --sae PAPER_SAE_DIR --format sparsify --out OUT_DIR --check-store STORE_DIR

SAELens: ``cfg.json`` (architecture "topk", SAELens 6 layout) + ``sae_weights.safetensors``; sparsify: ``cfg.json``
+ ``sae.safetensors`` (``encoder.weight (n, d)``). A ``topk`` SAE is exported exactly. The ``paper`` variant has
no ReLU before top-k and both libraries apply one, so it is exact only while its top-k values are
non-negative: ``--check-store`` encodes up to ``--check-rows`` rows of a store and refuses when any is
negative (``--allow-negative`` exports anyway, with a warning); without it the export warns.
The SAE's provenance (backbone, output kind, normalisation, preprocessing) goes into SAELens's ``metadata``
(``model_name``, ``hook_name`` and the whole record) or, for sparsify, into ``provenance.json`` beside its files;
its latent firing frequencies into ``sparsity.safetensors`` (log10, as SAELens writes them).
"""

from __future__ import annotations

import argparse

import numpy as np

from artifacts.cli import run_main
from sae.interop import FORMATS, export_sae_dir


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", required=True, help="SAE directory to export (SAE_DIR)")
    p.add_argument("--format", required=True, choices=FORMATS, help="layout to write")
    p.add_argument("--out", required=True, help="directory to write (OUT_DIR)")
    p.add_argument("--check-store", default=None, help="store whose rows check a paper SAE's top-k signs (default: none)")
    p.add_argument("--check-rows", type=int, default=8192, help="rows of --check-store to encode (default: 8192)")
    p.add_argument("--allow-negative", action="store_true", help="export a paper SAE despite negative values (default: off)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR (default: off)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    x_check = None
    if args.check_store is not None:
        from embeddings.store import EmbeddingStore

        x_check = np.asarray(EmbeddingStore.open(args.check_store).x[: args.check_rows], dtype=np.float32)
    out = export_sae_dir(
        args.sae, args.out, args.format, x_check=x_check, allow_negative=args.allow_negative, overwrite=args.overwrite
    )
    print(f"wrote {args.sae} in the {args.format} layout to {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
