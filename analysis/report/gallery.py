"""The concept gallery and the image cards of the report.

Gallery: the most used concepts (latents that the most images select), each with a description and a strip of
its top-activating images. Cards: a few test images, each with its active concepts, its nearest training
neighbours in code space, how many of them share each of its concepts, and the global and TTT predictions when
the run made them. Images are thumbnails written under ``RUN_DIR/report/assets/`` (PNG) and referenced by
relative path in ``report.json``; the page embeds them. Every label, id and name is data, escaped on the page.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

THUMB = 64


def esc(value) -> str:
    """Any value as escaped HTML text."""
    return html.escape(str(value), quote=True)


def image_uri(path: Path) -> str | None:
    """A PNG file as a data URI, or None when it is missing."""
    if not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


class StoreImages:
    """Row -> thumbnail of the image behind a store row, by reopening the store's source (None when gone)."""

    def __init__(self, store):
        from embeddings.sources import open_source

        self.store = store
        cfg = store.config
        try:
            self.source = open_source(cfg["source"], kind=cfg.get("kind", "auto"), seed=cfg.get("seed", 0),
                                      val_fraction=cfg.get("val_fraction"), test_fraction=cfg.get("test_fraction"))
            self.row_of = {sid: i for i, sid in enumerate(self.source.ids)}
        except Exception as e:  # the images moved away: the report says so instead of failing
            self.source, self.reason = None, f"images not available ({type(e).__name__}: {e})"

    def thumbnail(self, row: int, out_dir: Path) -> str | None:
        """Write the thumbnail of store row ``row`` and return its file name, or None."""
        if self.source is None:
            return None
        i = self.row_of.get(self.store.ids[row])
        if i is None:
            return None
        try:
            image = self.source.load(i)
        except Exception:
            return None
        if max(image.size) > THUMB:
            image.thumbnail((THUMB, THUMB))
        name = f"row{row}.png"
        image.save(out_dir / name)
        return name


def build_gallery(store, codes, out_dir: Path, n_concepts: int = 8, n_images: int = 8, namer=None,
                  images: StoreImages | None = None) -> dict:
    """The ``n_concepts`` most used concepts with descriptions (``analysis.concepts.naming``) and top-activating images
    (``namer``, ``images``: built from the store when not given)."""
    from analysis.concepts.naming import ConceptNamer

    out_dir.mkdir(parents=True, exist_ok=True)
    images = images or StoreImages(store)
    namer = namer or ConceptNamer(codes, store.labels, store.classes)
    concepts = []
    for latent in np.argsort(-namer.counts, kind="stable")[:n_concepts]:
        entry = namer.describe(int(latent), n_top=n_images)
        top = entry["top_rows"]
        thumbs = [images.thumbnail(int(r), out_dir) for r in top]
        concepts.append({
            "latent": int(latent), "n_rows": entry["n_images"], "frequency": entry["frequency"],
            "description": entry["description"], "purity": (entry["all_labels"] or {}).get("purity"),
            "top_rows": [int(r) for r in top], "top_ids": [store.ids[int(r)] for r in top],
            "images": [f"{out_dir.name}/{t}" if t else None for t in thumbs],
        })
    return {"concepts": concepts, "images_note": getattr(images, "reason", None)}


def build_cards(store, codes, out_dir: Path, rows: np.ndarray, n_neighbours: int = 8,
                predictions: dict | None = None, namer=None, images: StoreImages | None = None) -> dict:
    """Image cards for store ``rows``: concepts, nearest training neighbours in code space (cosine), the concepts
    they share, and ``predictions`` ``{"global": {row: class}, "ttt": {row: class}}`` when given."""
    from analysis.concepts.naming import ConceptNamer
    from analysis.neighbours import NeighbourIndex, SparseCodes

    namer = namer or ConceptNamer(codes, store.labels, store.classes)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = images or StoreImages(store)
    everything = SparseCodes(np.asarray(codes.values), np.asarray(codes.indices), codes.n_latents)
    index = NeighbourIndex(metric="cosine").fit(everything, rows=np.asarray(store.split["train"]))
    _, found = index.search(everything.take(rows), n_neighbours)
    name = (lambda y: store.classes[y] if 0 <= y < len(store.classes) else str(y))
    cards = []
    for row, nbrs in zip(rows, found):
        nbrs = [int(r) for r in nbrs if r >= 0]
        own = [int(i) for i, v in zip(codes.indices[row], codes.values[row]) if v > 0]
        nbr_sets = [set(int(i) for i in codes.indices[r]) for r in nbrs]
        thumb = images.thumbnail(int(row), out_dir)
        card = {
            "row": int(row), "id": store.ids[int(row)], "label": name(int(store.labels[row])),
            "image": f"{out_dir.name}/{thumb}" if thumb else None,
            "union": len(set().union(*nbr_sets)) if nbr_sets else 0,
            "concepts": [{"latent": k, "shared_by": sum(k in s for s in nbr_sets),
                          "description": namer.describe(k, n_top=1)["description"]}
                         for k in own],
            "neighbours": [{"row": r, "label": name(int(store.labels[r])),
                            "image": (f"{out_dir.name}/{t}" if (t := images.thumbnail(r, out_dir)) else None)}
                           for r in nbrs],
        }
        for kind in ("global", "ttt"):
            if predictions and int(row) in predictions.get(kind, {}):
                card[kind] = name(int(predictions[kind][int(row)]))
        cards.append(card)
    return {"cards": cards, "space": "codes (cosine)", "images_note": getattr(images, "reason", None)}


def _img(run_dir: Path | None, rel: str | None, alt: str, css: str = "") -> str:
    uri = image_uri(run_dir / "report" / rel) if run_dir is not None and rel else None
    if uri is None:
        return f"<span class=small>[{esc(alt)}: no image]</span>"
    cls = f" class={css}" if css else ""
    return f'<img{cls} src="{uri}" alt="{esc(alt)}" title="{esc(alt)}">'


def render_gallery(gallery: dict | None, run_dir: Path | None = None) -> str:
    """The gallery as HTML (escaped)."""
    if not gallery or not gallery.get("concepts"):
        return "<p>No concept gallery in this run (it needs the SAE codes).</p>"
    run_dir = Path(gallery["run_dir"]) if gallery.get("run_dir") else run_dir
    rows = []
    for c in gallery["concepts"]:
        thumbs = "".join(_img(run_dir, rel, f"row {r}: {i}")
                         for rel, r, i in zip(c["images"], c["top_rows"], c["top_ids"]))
        rows.append(f"<tr><td>concept {c['latent']}</td><td>{esc(c['description'])}</td>"
                    f"<td class=num>{100 * c['frequency']:.1f}% ({c['n_rows']})</td><td class=thumbs>{thumbs}</td></tr>")
    note = f"<p class=small>{esc(gallery['images_note'])}</p>" if gallery.get("images_note") else ""
    return (f"{note}<table id=gallery><tr><th>Concept</th><th>Description</th><th>Used by</th>"
            f"<th>Top-activating images</th></tr>{''.join(rows)}</table>")


def render_cards(cards: dict | None, run_dir: Path | None = None) -> str:
    """The image cards as HTML (escaped)."""
    if not cards or not cards.get("cards"):
        return "<p>No image cards in this run (they need the SAE codes).</p>"
    run_dir = Path(cards["run_dir"]) if cards.get("run_dir") else run_dir
    out = []
    for c in cards["cards"]:
        concepts = "".join(f"<li><b>{k['shared_by']}/{len(c['neighbours'])}</b> neighbours share concept {k['latent']} "
                           f"<span class=small>({esc(k['description'].split(';')[0])})</span></li>"
                           for k in c["concepts"])
        neighbours = "".join(_img(run_dir, n["image"], f"row {n['row']}: {n['label']}") for n in c["neighbours"])
        pred = (f"global: <b>{esc(c['global'])}</b>, TTT: <b>{esc(c['ttt'])}</b>" if c.get("ttt") is not None
                else "predictions: not made in this run")
        out.append(f"<div class=card><div class=cardhead>{_img(run_dir, c['image'], c['id'], 'query')}<div>image "
                   f"<b>{esc(c['id'])}</b><br>label <b>{esc(c['label'])}</b><br>{pred}<br><span class=small>"
                   f"{len(c['neighbours'])} nearest training neighbours use {c['union']} distinct concepts</span>"
                   f"</div></div><ul>{concepts}</ul><div class=thumbs>{neighbours}</div></div>")
    note = (f"<p class=small>Neighbours on the cards are the nearest training images in {esc(cards.get('space'))}; "
            f"{esc(cards.get('predictions_note') or 'no predictions were made for them in this run')}.</p>")
    return f"{note}<div class=cards>{''.join(out)}</div>"
