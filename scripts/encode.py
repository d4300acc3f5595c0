"""Encode every row of an embedding store into a CodeStore with a trained SAE.

    python scripts/encode.py --store STORE_DIR --sae SAE_DIR --out CODES_DIR [--batch-size 4096] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys

from analysis.stages import encode_store
from artifacts import ArtifactError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="embedding store directory (STORE_DIR)")
    parser.add_argument("--sae", required=True, help="SAE checkpoint directory (SAE_DIR)")
    parser.add_argument("--out", required=True, help="codes directory to write (CODES_DIR)")
    parser.add_argument("--batch-size", type=int, default=4096, help="rows encoded at a time")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing CODES_DIR")
    args = parser.parse_args(argv)
    try:
        codes = encode_store(
            args.store, args.sae, args.out, batch_size=args.batch_size, device=args.device, overwrite=args.overwrite
        )
    except (ArtifactError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    firing = codes.meta["firing"]
    print(
        f"wrote {codes.n} codes (k={codes.k}, {codes.n_latents} latents, "
        f"{firing.get('dead_fraction', 0.0):.1%} never fired) to {codes.codes_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
