"""One image's concepts, its nearest neighbours and the concepts they share.

    python scripts/query.py --sae SAE_DIR --store STORE_DIR [--codes CODES_DIR]
        (--index I | --id IMAGE_ID | --image PATH) [--neighbours 10] [--space embeddings|reconstructions|codes]
        [--json] [--sheet OUT.png] [--device cpu]

Without --codes the store is encoded in memory first. --image runs the store's own backbone (the weights and
preprocessing recorded in its meta), then the SAE. --json prints the schema documented in the README.
"""

from __future__ import annotations

import argparse
import json

import artifacts.threads  # noqa: F401  (sleeping OpenMP threads; set before torch loads)
import torch  # noqa: E402

from analysis.concepts.query import QueryEngine, embed_image, format_text
from analysis.spaces import SPACE_NAMES
from artifacts.cli import run_main
from embeddings.store import EmbeddingStore
from sae.checkpoint import load_sae
from sae.codes import CodeStore


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sae", required=True, help="SAE checkpoint directory (SAE_DIR)")
    parser.add_argument("--store", required=True, help="embedding store directory (STORE_DIR)")
    parser.add_argument("--codes", help="codes of the store (CODES_DIR); encoded in memory when left out")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--index", type=int, help="a row of the store")
    which.add_argument("--id", help="an image id of the store (ids.json)")
    which.add_argument("--image", help="a new image file, embedded with the store's backbone")
    parser.add_argument("--neighbours", type=int, default=10, help="neighbourhood size (default 10)")
    parser.add_argument("--space", default="embeddings", choices=SPACE_NAMES, help="where neighbours are found")
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")
    parser.add_argument("--sheet", help="write a contact sheet PNG here")
    parser.add_argument("--device", default="cpu", help="torch device of the backbone for --image")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.neighbours < 1:
        raise ValueError(f"--neighbours must be >= 1, got {args.neighbours}")
    if args.sheet is not None and not args.sheet.lower().endswith(".png"):
        raise ValueError(f"--sheet must name a .png file, got {args.sheet!r}")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:  # torch's own message lists every device type it knows
        raise ValueError(f"--device {args.device!r} is not a torch device; use cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    store = EmbeddingStore.open(args.store)
    engine = QueryEngine(store, load_sae(args.sae), CodeStore.open(args.codes) if args.codes else None)
    query_image = None
    if args.image is not None:
        from embeddings.images import load_rgb

        x = embed_image(store, args.image, device=args.device)
        answer = engine.query_vector(x, args.neighbours, args.space, image_path=args.image)
        query_image = load_rgb(args.image)
    else:
        row = engine.row_of(index=args.index, image_id=args.id)
        answer = engine.query(row, args.neighbours, args.space)
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
                                                      f" (images not available: {sheet['reason']})"))
    return 0


if __name__ == "__main__":
    run_main(main)
