"""Run the default pipeline on the bundled digits: backbone, embedding store, SAE, codes and a summary.

    python scripts/reproduce.py --out runs/digits [--device cpu] [--seed 0]

Running the same command again finishes an interrupted run and reuses the completed stages.
"""

from __future__ import annotations

import argparse
import sys

from analysis.pipeline import DigitsRunConfig, run_digits
from artifacts import ArtifactError


def main(argv: list[str] | None = None) -> int:
    defaults = DigitsRunConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/digits", help="output directory (default runs/digits)")
    p.add_argument("--device", default="cpu", help="torch device for every stage")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--cnn-width", type=int, default=defaults.cnn_width)
    p.add_argument("--cnn-epochs", type=int, default=defaults.cnn_epochs)
    p.add_argument("--sae-n-latents", type=int, default=defaults.sae_n_latents)
    p.add_argument("--sae-k", type=int, default=defaults.sae_k)
    p.add_argument("--sae-epochs", type=float, default=defaults.sae_epochs)
    args = p.parse_args(argv)
    try:
        config = DigitsRunConfig(
            cnn_width=args.cnn_width, cnn_epochs=args.cnn_epochs, sae_n_latents=args.sae_n_latents,
            sae_k=args.sae_k, sae_epochs=args.sae_epochs, seed=args.seed,
        )
        summary = run_digits(args.out, config, device=args.device)
    except (ArtifactError, ValueError) as e:
        print(f"reproduce.py: error: {e}", file=sys.stderr)
        return 2
    backbone, sae = summary["backbone"], summary["sae"]
    print(f"backbone: {backbone['n_features']}-d digits CNN, test accuracy {backbone.get('test_accuracy', float('nan')):.4f}")
    print(f"store:    {summary['store']['n']} embeddings, split {summary['store']['split']}")
    heldout = sae["heldout"]
    print(
        f"sae:      {sae['n_latents']} latents, k={sae['k']}; held-out FVU {heldout.get('fvu', float('nan')):.4f}, "
        f"L0 {heldout.get('l0', float('nan')):.1f}, dead {heldout.get('dead_fraction', float('nan')):.1%}"
    )
    print(f"codes:    {summary['codes']['n']} rows in {summary['codes']['dir']}")
    print(f"summary written to {args.out}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
