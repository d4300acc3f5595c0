"""One image's concepts, its nearest neighbours and the concepts they share.

    python scripts/query.py --sae SAE_DIR --store STORE_DIR [--codes CODES_DIR]
        (--index I | --id IMAGE_ID | --image PATH) [--n-neighbours 10] [--space embeddings|reconstructions|codes]
        [--json] [--sheet OUT.png] [--predict | --head HEAD_DIR] [--exact] [--index-dir DIR | --no-index-cache]
        [--device cpu] [--config FILE]

Without --codes the store is encoded in memory first. Each space's neighbour index is built on first use (exact
on small stores; IVF with its recall against exact measured on the store on large ones, or exact with --exact),
saved beside the codes (CODES_DIR-index, or STORE_DIR-index) under a key of the hashes of what it indexes, and
reused by later queries. --image runs the store's own backbone (the weights and preprocessing recorded in its
meta), then the SAE. --predict adds what a global head (trained once on the store's train split and kept beside
the index) and local TTT predict; --head uses a saved head instead. --json prints the schema documented in the
README. Only what the asked output needs is imported: no torch for a store row with saved codes and index.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from analysis.concepts.query import QueryEngine, embed_image
from analysis.concepts.query_text import format_text
from analysis.space_index import IndexSettings
from analysis.spaces import SPACE_NAMES
from artifacts.cli import run_main
from artifacts.flags import add_config_file_flag, add_config_flags, parse_args
from embeddings.store import EmbeddingStore
from sae.codes import CodeStore


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", required=True, help="SAE checkpoint directory (SAE_DIR)")
    p.add_argument("--store", required=True, help="embedding store directory (STORE_DIR)")
    p.add_argument("--codes", help="codes of the store (CODES_DIR) (default: none, encoded in memory)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--index", type=int, help="a row of the store, 0..n-1 (default: none; one of --index, --id "
                                                 "and --image is required)")
    which.add_argument("--id", help="an image id of the store, from ids.json (default: none)")
    which.add_argument("--image", help="a new image file, embedded with the store's backbone (default: none)")
    p.add_argument("--n-neighbours", type=int, default=10, help="neighbourhood size (default: 10)")
    p.add_argument("--space", default="embeddings", choices=SPACE_NAMES,
                   help="where neighbours are found (default: embeddings)")
    p.add_argument("--json", action="store_true", help="print the answer as JSON (default: text)")
    p.add_argument("--sheet", help="write a contact sheet PNG here (default: none)")
    predict = p.add_mutually_exclusive_group()
    predict.add_argument("--predict", action="store_true",
                         help="add the global head's and local TTT's predictions; a linear head is trained on the "
                              "store's train split once and kept beside the index (default: off)")
    predict.add_argument("--head", help="a saved global head directory (analysis.heads.save_head) to predict with "
                                        "(default: none)")
    add_config_flags(p, IndexSettings, names={"seed": "index-seed"})
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--index-dir", help="where neighbour indexes are saved and reused (default: CODES_DIR-index, "
                                           "or STORE_DIR-index without --codes)")
    cache.add_argument("--no-index-cache", action="store_true",
                       help="build the index in memory and save nothing (default: off)")
    p.add_argument("--device", default="cpu", help="torch device of the backbone for --image (default: cpu)")
    add_config_file_flag(p)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Refuse flag values before anything is loaded."""
    if args.n_neighbours < 1:
        raise ValueError(f"--n-neighbours must be >= 1, got {args.n_neighbours}")
    if args.sheet is not None:
        if not args.sheet.lower().endswith(".png"):
            raise ValueError(f"--sheet must name a .png file, got {args.sheet!r}")
        if not Path(args.sheet).resolve().parent.is_dir():
            raise ValueError(f"--sheet {args.sheet}: its folder {Path(args.sheet).parent} does not exist")
    if args.device != "cpu":
        import torch  # only a device other than the default needs torch to be checked

        try:
            device = torch.device(args.device)
        except RuntimeError as e:  # torch's own message lists every device type it knows
            raise ValueError(f"--device {args.device!r} is not a torch device; use cpu, cuda or cuda:N") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available here; use --device cpu")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(parser(), argv)
    check_args(args)
    store = EmbeddingStore.open(args.store)
    codes = CodeStore.open(args.codes) if args.codes else None
    index_dir = None if args.no_index_cache else (args.index_dir or "auto")
    index_settings = IndexSettings(**{f: getattr(args, f) for f in IndexSettings.__dataclass_fields__})
    engine = QueryEngine(store, args.sae, codes, index_dir=index_dir, settings=index_settings)
    x = query_image = None
    if args.image is not None:
        from embeddings.images import load_rgb

        x = embed_image(store, args.image, device=args.device)
        answer = engine.query_vector(x, args.n_neighbours, args.space, image_path=args.image)
        query_image = load_rgb(args.image)
    else:
        answer = engine.query(engine.row_of(index=args.index, image_id=args.id), args.n_neighbours, args.space)
    if args.predict or args.head:
        from analysis.concepts.query_predict import head_for, predict, query_features

        head, info = head_for(engine, args.space, args.head)
        answer["prediction"] = predict(engine, answer, query_features(engine, answer, x), head, info)
    answer["sheet"] = None
    if args.sheet:
        from analysis.concepts.sheet import contact_sheet  # matplotlib: imported only when a sheet is asked for

        answer["sheet"] = contact_sheet(answer, store, engine.namer, args.sheet, query_image=query_image)
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        print(format_text(answer))
        if answer["sheet"]:
            sheet = answer["sheet"]
            print(f"contact sheet: {sheet['path']}" + ("" if sheet["images_available"] else
                                                      f" (images not available: {sheet['reason']})")
                  + (f"; {'; '.join(sheet['cuts'])}" if sheet["cuts"] else ""))
    return 0


if __name__ == "__main__":
    run_main(main)
