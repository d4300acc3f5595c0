"""Local test-time training on a store: global head vs TTT vs kNN majority, locality, sweeps, and with an SAE
and its codes the concept masks (O2) and the dense-vs-sparse agreement (O3).

    python scripts/ttt.py --store STORE_DIR --out RESULTS_DIR [--sae SAE_DIR --codes CODES_DIR]
        [--n-neighbours 50] [--steps 50] [--lr 0.01] [--impl exact|fast|reference] [--device cpu] ...
    torchrun --nproc_per_node=2 scripts/ttt.py --store STORE_DIR --out RESULTS_DIR     # queries split by rank

Writes RESULTS_DIR/results.json (every number with its standard error and n), PNG plots, config.json,
meta.json and chunks/ (per-query predictions, neighbours, losses). A killed run, started again with the same
command, continues with the queries not yet done.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from analysis.ttt.study import TTTStudyConfig, ttt_study
from analysis.parents import inputs_hash
from analysis.run.cache import remove_leftovers
from artifacts import (
    SCHEMA_VERSION, ArtifactError, check_replaceable, commit_dir, is_artifact_dir, lock, package_version, partial_dir,
    read_json, write_json,
)
from artifacts.cli import run_main
from artifacts.flags import SETTINGS_FILE, add_config_file_flag, add_config_flags, parse_args, write_settings
from artifacts.ranks import Ranks, resolve_device, resolve_device_type
from embeddings.store import EmbeddingStore
from sae.checkpoint import load_sae
from sae.codes import CodeStore


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="embedding store directory (STORE_DIR)")
    p.add_argument("--out", required=True, help="results directory (RESULTS_DIR)")
    p.add_argument("--sae", help="SAE directory: adds the mask and agreement analyses (needs --codes) (default: none)")
    p.add_argument("--codes", help="codes of the store made with --sae, from scripts/encode.py (default: none)")
    p.add_argument("--overwrite", action="store_true", help="replace a complete RESULTS_DIR (default: off)")
    add_config_flags(p, TTTStudyConfig)
    add_config_file_flag(p)
    return p


def _config(args: argparse.Namespace, device: str) -> TTTStudyConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TTTStudyConfig)}
    return TTTStudyConfig(**{**values, "device": device})


def _relative(plots: dict, work: Path) -> dict:
    return {k: Path(v).relative_to(work).as_posix() for k, v in plots.items()}


def _record(config: TTTStudyConfig, args, inputs: str) -> dict:
    return {"study": dataclasses.asdict(config), "store": str(args.store), "sae": args.sae, "codes": args.codes,
            "inputs": inputs}


def _finished(out: Path, record: dict, overwrite: bool) -> bool:
    """Whether ``out`` is this very evaluation, finished (True); refuses anything else unless ``overwrite`` allows
    replacing it, checked before any work."""
    if not os.path.lexists(out):
        return False
    if is_artifact_dir(out) and (out / "results.json").is_file():
        try:
            done = read_json(out / "config.json")
        except ArtifactError:
            done = None
        if isinstance(done, dict) and done.get("study") == json.loads(json.dumps(record["study"])) \
                and done.get("inputs") == record["inputs"]:
            return True
    check_replaceable(out, overwrite)  # a folder of someone else's, or without --overwrite: refused by name
    return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(parser(), argv)
    if (args.sae is None) != (args.codes is None):
        raise ValueError("--sae and --codes go together (the mask and agreement analyses need both)")
    try:
        resolve_device_type(args.device)
    except RuntimeError as e:  # torch's own message lists every device type it knows
        raise ValueError(f"--device {args.device!r} is not a torch device; use cpu, cuda, cuda:N or auto") from e
    ranks = Ranks.from_env(args.device)
    config = _config(args, str(resolve_device(args.device, ranks)))
    store = EmbeddingStore.open(args.store)
    sae = load_sae(args.sae, device=config.device) if args.sae else None
    codes = CodeStore.open(args.codes) if args.codes else None
    out = Path(args.out)
    record = _record(config, args, inputs_hash(store, sae, codes))
    if _finished(out, record, args.overwrite) and not args.overwrite:
        if ranks.is_main:
            print(f"{out} is this evaluation, already complete (same settings and inputs)")
            _print_summary(read_json(out / "results.json"), out)
        ranks.close()
        return 0
    if ranks.is_main:
        lock.acquire(out)  # two runs into one --out would mix their chunks
    try:
        _evaluate(store, sae, codes, config, out, record, args, ranks)
    finally:
        if ranks.is_main:
            lock.release(out)
    ranks.close()
    return 0


def _evaluate(store, sae, codes, config: TTTStudyConfig, out: Path, record: dict, args: argparse.Namespace,
              ranks: Ranks) -> None:
    work = partial_dir(out)
    if ranks.is_main:
        work.mkdir(parents=True, exist_ok=True)   # kept across kills: its chunks/ are the finished queries
        remove_leftovers(work, recursive=True)  # what a kill left mid-write: never committed
    ranks.barrier()
    log = print if ranks.is_main else None
    report = ttt_study(store, sae, codes, config, work, cache_dir=work / "chunks", ranks=ranks, log=log)
    if ranks.is_main:
        report["plots"] = _relative(report["plots"], work)
        write_json(work / "results.json", report)
        write_json(work / "config.json", record)
        write_settings(work / SETTINGS_FILE, args)
        write_json(work / "meta.json", {
            "kind": "ttt", "schema_version": SCHEMA_VERSION, "package_version": package_version(),
            "parents": {"store": store.content_hash, "inputs": record["inputs"]},
            "world_size": ranks.world_size})
        commit_dir(work, out, overwrite=args.overwrite)
        _print_summary(report, out)


def _fmt(m: dict) -> str:
    return f"{m['value']:.4f} ± {m['se'] or 0:.4f} (n={m['n']})"


def _print_summary(report: dict, out: Path) -> None:
    t = report["ttt"]
    print(f"global head   {_fmt(t['global_acc'])}")
    print(f"local TTT     {_fmt(t['ttt_acc'])}   gain {_fmt(t['gain'])}")
    print(f"kNN majority  {_fmt(t['majority_acc'])}")
    loc = t["locality"]
    print(f"locality      own neighbourhood {_fmt(loc['own_neighbourhood_acc'])}, "
          f"whole test set {_fmt(loc['whole_test_acc'])}")
    if "masks" in report:
        for kind, m in report["masks"].items():
            print(f"mask {kind:8s} acc {_fmt(m['acc'])}, concepts kept {m['kept']['value']:.1f} "
                  f"of {m['union']['value']:.1f}")
        print(f"dense vs sparse agreement {_fmt(t['dense_sparse_agreement'])}")
    print(f"results in {out}")


if __name__ == "__main__":
    run_main(main)
