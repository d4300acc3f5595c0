"""The concept gallery and the image cards of the report (their data; ``templates/`` draws them).

Gallery: the concepts that fire on the most images (the page says so), each with two statements that name their
population: the label counts over *every* image that uses the concept, and over the *shown* images (its
strongest activations), so that a description never contradicts its own images. Cards: a few test images drawn
at random (seeded), each with its active concepts, its neighbourhood as TTT uses it (the ``n_neighbours``
nearest training images in the embeddings, L2), how many neighbours share each of its concepts, and the global
and TTT predictions when the run made them. Every neighbour carries its label and its cosine similarity to the
card's image; the first ``n_shown`` are shown as thumbnails and the page states the cut. Thumbnails are PNGs
under ``RUN_DIR/report/assets/``, referenced by relative path in ``report.json``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

THUMB = 64


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
        """Write the thumbnail of store row ``row`` and return its path relative to ``out_dir``'s parent."""
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
        name = f"row{int(row)}.png"
        image.save(out_dir / name)
        return f"{out_dir.name}/{name}"


def class_namer(classes: list[str]):
    """Label -> class name (the label number for a label past the names)."""
    return lambda y: classes[y] if 0 <= y < len(classes) else str(y)


def label_counts(labels) -> dict:
    """``{label: count}``, most common first."""
    return dict(Counter(labels).most_common())


def build_gallery(store, codes, out_dir: Path, n_concepts: int = 8, n_images: int = 8, namer=None,
                  images: StoreImages | None = None, classes: list[str] | None = None) -> dict:
    """The ``n_concepts`` concepts that fire on the most images, each with its label counts over every image that
    uses it and over its ``n_images`` strongest images (shown, with their labels and activations)."""
    from analysis.concepts.naming import ConceptNamer

    classes = list(classes or store.classes)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = images or StoreImages(store)
    namer = namer or ConceptNamer(codes, store.labels, classes)
    name = class_namer(classes)
    concepts = []
    for latent in np.argsort(-namer.counts, kind="stable")[:n_concepts]:
        entry = namer.describe(int(latent), n_top=n_images)
        shown = [{"row": int(r), "id": store.ids[int(r)], "label": name(int(store.labels[r])),
                  "activation": float(v), "image": images.thumbnail(int(r), out_dir)}
                 for r, v in zip(entry["top_rows"], entry["top_values"])]
        concepts.append({
            "latent": int(latent), "n_rows": entry["n_images"], "frequency": entry["frequency"],
            "all_labels": (entry["all_labels"] or {}).get("labels"),
            "purity": (entry["all_labels"] or {}).get("purity"),
            "shown": shown, "shown_labels": label_counts(s["label"] for s in shown),
            "description": entry["description"], "top_rows": [s["row"] for s in shown],
            "top_ids": [s["id"] for s in shown], "images": [s["image"] for s in shown],
        })
    return {"concepts": concepts, "n_rows": int(codes.n), "n_images": n_images,
            "order": f"the {len(concepts)} concepts that fire on the most images of the store, most used first",
            "chosen": f"for each, its {n_images} images of strongest activation, strongest first",
            "images_note": getattr(images, "reason", None)}


def _neighbourhoods(store, rows: np.ndarray, n_neighbours: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_neighbours`` nearest training rows of each of ``rows`` in the embeddings (as TTT finds them), and
    their cosine similarity to the row."""
    from analysis.neighbours import NeighbourIndex

    x = np.asarray(store.x, dtype=np.float32)
    train = np.asarray(store.split["train"])
    n = min(n_neighbours, len(train))
    _, found = NeighbourIndex(metric=metric).fit(x, rows=train).search(x[rows], n)
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    cos = np.einsum("qd,qkd->qk", unit[rows], unit[np.maximum(found, 0)])
    return found, cos


def build_cards(store, codes, out_dir: Path, rows: np.ndarray, n_neighbours: int = 50, n_shown: int = 16,
                predictions: dict | None = None, namer=None, images: StoreImages | None = None,
                classes: list[str] | None = None, metric: str = "l2", seed: int = 0) -> dict:
    """Image cards for store ``rows`` (see the module docstring); ``predictions``: ``{"global": {row: class},
    "ttt": {row: class}}`` when the run made them."""
    from analysis.concepts.naming import ConceptNamer

    classes = list(classes or store.classes)
    namer = namer or ConceptNamer(codes, store.labels, classes)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = images or StoreImages(store)
    name = class_namer(classes)
    found, cos = _neighbourhoods(store, rows, n_neighbours, metric)
    cards = []
    for row, nbrs, sims in zip(rows, found, cos):
        keep = nbrs >= 0
        nbrs, sims = [int(r) for r in nbrs[keep]], [float(s) for s in sims[keep]]
        nbr_sets = [set(int(i) for i, v in zip(codes.indices[r], codes.values[r]) if v > 0) for r in nbrs]
        own = [int(i) for i, v in zip(codes.indices[row], codes.values[row]) if v > 0]
        card = {
            "row": int(row), "id": store.ids[int(row)], "label": name(int(store.labels[row])),
            "image": images.thumbnail(int(row), out_dir),
            "union": len(set().union(*nbr_sets)) if nbr_sets else 0,
            "concepts": [_card_concept(namer, k, sum(k in s for s in nbr_sets)) for k in own],
            "neighbours": [{"row": r, "id": store.ids[r], "label": name(int(store.labels[r])), "similarity": s,
                            "image": images.thumbnail(r, out_dir) if i < n_shown else None}
                           for i, (r, s) in enumerate(zip(nbrs, sims))],
            "neighbour_labels": label_counts(name(int(store.labels[r])) for r in nbrs),
        }
        for kind in ("global", "ttt"):
            if predictions and int(row) in predictions.get(kind, {}):
                card[kind] = name(int(predictions[kind][int(row)]))
        cards.append(card)
    return {"cards": cards, "space": f"the embeddings ({metric.upper()}, as TTT finds them)", "n_shown": n_shown,
            "n_neighbours": int(found.shape[1]) if found.size else 0,
            "chosen": f"{len(cards)} test images drawn at random (seed {seed}) from the test split",
            "images_note": getattr(images, "reason", None)}


def _card_concept(namer, latent: int, shared_by: int) -> dict:
    """One concept of a card: how many neighbours share it, and who uses it over the whole store."""
    entry = namer.describe(latent, n_top=0)
    every = entry["all_labels"] or {}
    return {"latent": latent, "shared_by": shared_by, "n_rows": entry["n_images"], "frequency": entry["frequency"],
            "top_label": every.get("top_label"), "purity": every.get("purity")}
