"""Reproduce the paper's concept-sparsity validation and TTT results with one command, and write a report.

    python scripts/reproduce.py                                   # the digits preset into runs/digits
    python scripts/reproduce.py --preset mnist --data DIR         # MNIST-format IDX files on disk
    python scripts/reproduce.py --preset imagenet-clip --data IMAGENET_DIR [--weights FILE] [--sae SAE_DIR]
    python scripts/reproduce.py --preset theory                   # the simulation of the paper's Section 2

Every stage is cached in --out by a hash of its inputs and settings: running the same command again reuses what
is done, a changed setting reruns exactly the stages that depend on it (and says which setting changed), and a
killed run resumes. RUN_DIR/report.json holds every number; RUN_DIR/report.html is the page to read.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from analysis.run.presets import PRESETS, reproduce
from artifacts.cli import run_main


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="digits", choices=PRESETS, help="which study to run (default digits)")
    p.add_argument("--out", default=None, help="run directory (default runs/PRESET)")
    p.add_argument("--data", default=None, help="data folder: IDX files (mnist) or train/ and val/ (imagenet-clip)")
    p.add_argument("--device", default="cpu", help="torch device for every stage (cpu, cuda)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for digits, mnist and theory, whose tensors are small)")
    p.add_argument("--quick", action="store_true", default=None, help="a smaller run that exercises every stage")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--cnn-width", type=int, default=None, help="channels of the CNN backbone (default 8)")
    p.add_argument("--cnn-epochs", type=int, default=None)
    p.add_argument("--sae-n-latents", type=int, default=None)
    p.add_argument("--sae-k", type=int, default=None)
    p.add_argument("--sae-epochs", type=float, default=None)
    p.add_argument("--n-neighbours", type=int, default=None, help="neighbourhood size of the studies (default 50)")
    p.add_argument("--widths", default=None, help="comma-separated CNN widths of the scaling sweep ('' for none)")
    p.add_argument("--backbone", default=None, help="imagenet-clip: recipe (default paper-clip-vit-b16)")
    p.add_argument("--weights", default=None, help="imagenet-clip: hub (default) or a local weights file")
    p.add_argument("--sae", default=None, help="imagenet-clip: an existing SAE directory to use instead of training")
    p.add_argument("--study-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the concept/TTT (or theory) study's config, e.g. umap=false n_queries=500; "
                        "repeatable; the value is read as JSON when it parses, else as text")
    return p


def study_settings(pairs: list[str]) -> dict:
    """``["umap=false", "n_queries=500"]`` -> ``{"umap": False, "n_queries": 500}``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--study-set takes KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = {k: getattr(args, k) for k in ("data", "quick", "seed", "cnn_width", "cnn_epochs", "sae_n_latents",
                                              "sae_k", "sae_epochs", "n_neighbours", "backbone", "weights", "sae")}
    if args.study_set:
        settings["study"] = study_settings(args.study_set)
    if args.widths is not None:
        try:
            settings["widths"] = tuple(int(w) for w in args.widths.split(",") if w.strip())
        except ValueError:
            raise ValueError(f"--widths must be comma-separated integers, got {args.widths!r}") from None
    out = args.out or f"runs/{args.preset}"
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        report = reproduce(args.preset, out, device=args.device, threads=args.threads, **settings)
    failed = {k: v for k, v in report["sections"].items() if v["status"] == "failed"}
    for row in report["comparisons"]:
        name = row["metric"] if row["metric"] != "theory.claims" else row["claim"][:60]
        ours = row["ours"]
        number = "—" if ours["value"] is None else f"{ours['value']:.4g} ± {ours['se'] or 0:.2g}"
        print(f"  {name:<60} {number}  {row['verdict']}")
    print(f"report: {out}/report.html")
    if failed:
        for name, s in failed.items():
            print(f"reproduce.py: error: section {name} failed: {s['reason']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_main(main)
