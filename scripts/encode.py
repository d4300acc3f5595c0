"""Encode every row of an embedding store into a CodeStore with a trained SAE.

    python scripts/encode.py --store STORE_DIR --sae SAE_DIR --out CODES_DIR [--batch-size 4096] [--device cpu]

The store's files are checked against the content hash its meta.json records (the codes record it as their
parent); ``--no-verify`` skips that full read on stores too large to hash each time.
"""

from __future__ import annotations

import argparse

from analysis.run.store_stages import encode_store
from artifacts.cli import run_main
from artifacts.flags import SETTINGS_FILE, add_config_file_flag, parse_args, write_settings


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="embedding store directory (STORE_DIR)")
    p.add_argument("--sae", required=True, help="SAE checkpoint directory (SAE_DIR)")
    p.add_argument("--out", required=True, help="codes directory to write (CODES_DIR)")
    p.add_argument("--batch-size", type=int, default=4096, help="rows encoded at a time (default: 4096)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing CODES_DIR, an artifact of this toolkit (default: off)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the content-hash check of STORE_DIR (huge stores; the cheap size checks still run) (default: off)")
    add_config_file_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(parser(), argv)
    codes = encode_store(
        args.store, args.sae, args.out, batch_size=args.batch_size, device=args.device, overwrite=args.overwrite,
        verify_store=not args.no_verify,
    )
    write_settings(codes.codes_dir / SETTINGS_FILE, args)  # --config of it encodes again
    firing = codes.meta["firing"]
    print(
        f"wrote {codes.n} codes (k={codes.k}, {codes.n_latents} latents, "
        f"{firing.get('dead_fraction', 0.0):.1%} never fired) to {codes.codes_dir}"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
