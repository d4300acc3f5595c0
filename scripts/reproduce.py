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

from analysis.run.presets import PRESETS, UNUSED, reproduce
from analysis.report.summary import summary_lines
from artifacts.cli import run_main
from artifacts.flags import add_config_file_flag, add_config_flags, parse_args


def _preset_defaults() -> dict[str, str]:
    """Each setting's default in words, per preset (``None`` in the config means "the preset decides")."""
    from analysis.run.presets import ImageStudyConfig, preset_config

    configs = {p: preset_config(p, **({} if p == "digits" else {"data": "DIR"})) for p in PRESETS if p != "theory"}
    text = {}
    for name in ImageStudyConfig.__dataclass_fields__:
        values = [f"{p} {_word(getattr(c, name))}" for p, c in configs.items() if name not in UNUSED.get(p, ())]
        text[name] = ", ".join(values) if values else "none"
    text["data"] = "none; mnist and imagenet-clip need it"
    text["sae"] = "none: imagenet-clip trains its own"
    return text


def _word(value) -> str:
    if value is None:
        return "from the data"
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "none"
    return str(value)


def parser() -> argparse.ArgumentParser:
    from analysis.run.presets import ImageStudyConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="digits", choices=PRESETS, help="which study to run (default: digits)")
    p.add_argument("--out", default=None, help="run directory: new, empty, or a run directory (default: runs/PRESET)")
    p.add_argument("--device", default="cpu", help="torch device for every stage: cpu, cuda, cuda:N (default: cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for digits, mnist and theory, whose tensors are small; "
                        "torch's own otherwise)")
    add_config_flags(p, ImageStudyConfig, defaults={f: None for f in ImageStudyConfig.__dataclass_fields__},
                     default_text=_preset_defaults())
    p.add_argument("--study-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the concept/TTT (or theory) study's config, e.g. umap=false n_queries=500; "
                        "repeatable; the value is read as JSON when it parses, else as text; checked against the "
                        "studies' settings before the run (default: none)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars or progress lines on stderr (default: bars in a terminal, else a line "
                        "every few seconds)")
    add_config_file_flag(p)
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
    args = parse_args(parser(), argv)
    settings = {k: getattr(args, k) for k in ("data", "quick", "seed", "cnn_width", "cnn_epochs", "sae_n_latents",
                                              "sae_k", "sae_epochs", "n_neighbours", "widths", "backbone", "weights",
                                              "sae")}
    if args.study_set:
        settings["study"] = study_settings(args.study_set)
    out = args.out or f"runs/{args.preset}"
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        report = reproduce(args.preset, out, device=args.device, threads=args.threads,
                           show_progress=not args.no_progress, **settings)
    failed = {k: v for k, v in report["sections"].items() if v["status"] == "failed"}
    for line in summary_lines(report, f"{out}/report.html"):
        print(line)
    if failed:
        for name, s in failed.items():
            print(f"reproduce.py: error: section {name} failed: {s['reason']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_main(main)
