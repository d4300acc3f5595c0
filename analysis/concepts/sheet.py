"""Contact sheets: the query and every requested neighbour, a neighbour × concept grid, and concept strips.

Three sections, each as wide as it needs: the tiles (the query, then the neighbours nearest first, wrapped at
``TILE_COLS`` a row), the grid (one row per concept of the query, then per concept two or more neighbours
share; one column per image; a cell is filled when that image uses that concept, shaded by its activation,
with the count of neighbours using it at the right), and one strip per strongest concept of the query with its
top-activating images. What does not fit (``max_neighbours``, ``max_grid_concepts``, ``n_concepts``) is cut and
the sheet says how many it cut; a footer explains every number on it. Every string from the data (class names,
ids, paths) is drawn through ``plain`` with math text off, so a name like ``$\\frac$`` is drawn as written.

Images come from the store's source: the bundled digits (ids are dataset rows), or image files whose ids are
paths relative to the source root recorded in the store's meta. When they cannot be had (a store of another
kind, or one moved away from its images) the tile says so and ``images_available`` tells the caller.
"""

from __future__ import annotations

import errno
import textwrap
from collections import Counter
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from analysis.concepts.query_text import plain  # noqa: E402
from artifacts import DiskFullError, atomic_file  # noqa: E402
from embeddings.store import EmbeddingStore  # noqa: E402

TILE_COLS = 10
"""Tiles per row of the neighbour section."""
LEGEND = ("Tiles: #rank (1 = nearest), label, cosine similarity to the query. Grid: a filled cell = the image of "
          "that column uses the concept of that row, shaded by its activation (colour bar); Q = the query, 1..N = "
          "neighbour rank; 'n/N' = neighbours using the concept. Strips: the concept's top-activating images of "
          "the store, each with its label and that concept's activation.")


def image_loader(store: EmbeddingStore) -> tuple[Callable[[int], Image.Image | None], str | None]:
    """``(load(row) -> RGB image or None, reason)``; ``reason`` says why no image can be shown, else ``None``."""
    source = store.meta.get("source") or {}
    kind = source.get("kind")
    if kind == "digits":
        from embeddings.digits import load_digits_images

        images, _ = load_digits_images(int(source.get("size", 32)))

        def load_digit(row: int) -> Image.Image | None:
            try:
                i = int(store.ids[row])
            except (TypeError, ValueError):
                return None
            return Image.fromarray(images[i]).convert("RGB") if 0 <= i < len(images) else None

        return load_digit, None
    root = source.get("root")
    if root is None or kind is None:
        return (lambda row: None), f"store {store.store_dir} does not record where its images are"
    root = Path(root)
    if not root.is_dir():
        return (lambda row: None), f"the images of store {store.store_dir} are not at {root} any more"
    from embeddings.images import BadImage, load_rgb

    def load_file(row: int) -> Image.Image | None:
        if not isinstance(store.ids[row], str):
            return None
        path = Path(store.ids[row])
        try:
            return load_rgb(path if path.is_absolute() else root / path)
        except (BadImage, OSError):
            return None

    return load_file, None


def _text(where, x: float, y: float, text: str, **kw):
    """Text drawn as written: no math text, whatever the string holds."""
    return where.text(x, y, text, parse_math=False, **kw)


def _tile(ax, image: Image.Image | None, caption: str) -> None:
    ax.set_xticks([]), ax.set_yticks([])
    if image is None:
        _text(ax, 0.5, 0.5, "no image", ha="center", va="center", fontsize=7, transform=ax.transAxes)
        ax.set_facecolor("#eeeeee")
    else:
        ax.imshow(np.asarray(image), cmap="gray")
    ax.set_title(caption, fontsize=7, parse_math=False)


def _activations(answer: dict, rows: list, codes) -> list[dict]:
    """Each image's active concepts ``{latent: activation}``: the query (its codes are in the answer when it is
    a new image), then the given neighbour rows."""
    out = [{c["latent"]: c["activation"] for c in answer["concepts"]}]
    for row in rows:
        values, indices = codes.codes([row])
        out.append({int(i): float(v) for v, i in zip(values[0], indices[0]) if v > 0})
    return out


def _plan(answer: dict, codes, max_neighbours: int, max_grid_concepts: int, n_concepts: int) -> dict:
    """What the sheet shows of the answer, and what it cuts. Grid rows: every concept of the query (strongest
    first), then those two or more of the shown neighbours share (most shared first)."""
    neighbours = answer["neighbours"][:max_neighbours]
    concepts = sorted(answer["concepts"], key=lambda c: -c["activation"])
    used = _activations(answer, [nb["row"] for nb in neighbours], codes)
    own = [c["latent"] for c in concepts]
    counts = Counter(latent for image in used[1:] for latent in image if latent not in own)
    others = [latent for latent, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if n >= 2]
    grid = (own + others)[:max_grid_concepts]
    cells = np.array([[image.get(latent, 0.0) for image in used] for latent in grid]).reshape(len(grid), len(used))
    strips = concepts[:n_concepts]
    shown = {"neighbours": [len(neighbours), len(answer["neighbours"])],
             "grid_concepts": [len(grid), len(own) + len(others)],
             "concept_strips": [len(strips), len(concepts)]}
    cuts = [f"showing {a} of {b} {what}" for what, (a, b) in
            (("neighbours", shown["neighbours"]), ("concepts in the grid", shown["grid_concepts"]),
             ("concepts as strips (the strongest)", shown["concept_strips"])) if a < b]
    return {"neighbours": neighbours, "grid": grid, "cells": cells, "strips": strips, "shown": shown, "cuts": cuts}


def _draw_tiles(fig, spec, answer: dict, neighbours: list[dict], load, query_image) -> None:
    n_tiles = 1 + len(neighbours)
    n_rows = int(np.ceil(n_tiles / TILE_COLS))
    cols = int(np.ceil(n_tiles / n_rows))  # rows as full as each other: no row of mostly empty slots
    grid = spec.subgridspec(n_rows, cols, hspace=0.55, wspace=0.12)
    q = answer["query"]
    image = query_image if query_image is not None else (load(q["row"]) if q["row"] is not None else None)
    where = f"row {q['row']}" if q["row"] is not None else plain(Path(str(q["image_path"] or "")).name, 14)
    _tile(fig.add_subplot(grid[0, 0]), image, f"QUERY {plain(q['label'], 12) if q['label'] else ''}\n{where}")
    for j, nb in enumerate(neighbours, start=1):
        label = plain(nb["label"] if nb["label"] is not None else nb["id"], 14)
        _tile(fig.add_subplot(grid[j // cols, j % cols]), load(nb["row"]),
              f"#{nb['rank']} {label}\n{nb['similarity']:.3f}")


def _draw_grid(fig, spec, plan: dict) -> None:
    cells = plan["cells"]
    ax = fig.add_subplot(spec)
    image = ax.imshow(np.ma.masked_equal(cells, 0.0), aspect="auto", cmap="Blues", interpolation="nearest", vmin=0)
    ax.set_facecolor("#f7f7f7")
    ax.set_xticks(range(cells.shape[1]), ["Q"] + [str(nb["rank"]) for nb in plan["neighbours"]], fontsize=7)
    ax.set_yticks(range(len(plan["grid"])), [f"concept {latent}" for latent in plan["grid"]], fontsize=7)
    ax.set_xlabel("image (Q = query, then neighbour rank)", fontsize=8)
    n_nb = len(plan["neighbours"])
    for i in range(len(plan["grid"])):
        _text(ax, cells.shape[1] - 0.3, i, f" {int((cells[i, 1:] > 0).sum())}/{n_nb}", va="center", fontsize=7)
    bar = fig.colorbar(image, ax=ax, fraction=0.025, pad=0.06)
    bar.set_label("activation", fontsize=7)
    bar.ax.tick_params(labelsize=6)


def _draw_strips(fig, spec, plan: dict, store: EmbeddingStore, namer, load, n_strip: int) -> None:
    grid = spec.subgridspec(len(plan["strips"]), n_strip + 1, hspace=0.6, wspace=0.12)
    for i, concept in enumerate(plan["strips"]):
        info = namer.describe(concept["latent"], n_top=n_strip)
        label_ax = fig.add_subplot(grid[i, 0])
        label_ax.axis("off")
        _text(label_ax, 0.0, 0.5, f"concept {concept['latent']}\nactivation {concept['activation']:.2f}\n"
              f"fires on {concept['frequency']:.1%}", fontsize=7, va="center", transform=label_ax.transAxes)
        for j, (row, value) in enumerate(zip(info["top_rows"], info["top_values"]), start=1):
            _tile(fig.add_subplot(grid[i, j]), load(row), f"{plain(answer_label(store, row), 12)} {value:.2f}")


def draw_sheet(answer: dict, store: EmbeddingStore, namer, *, query_image=None, n_concepts: int = 5,
               n_strip: int = 8, max_neighbours: int = 30, max_grid_concepts: int = 40):
    """``(figure, plan)`` of the sheet of a ``QueryEngine`` answer (``plan``: what is shown and cut)."""
    load, reason = image_loader(store)
    plan = _plan(answer, namer.codes, max_neighbours, max_grid_concepts, n_concepts)
    plan["reason"] = reason
    header = _header(answer, plan, reason)
    legend = "\n".join(textwrap.wrap(LEGEND, 190))
    n_tile_rows = int(np.ceil((1 + len(plan["neighbours"])) / TILE_COLS))
    # Section heights in inches; the gaps leave room for tick labels and captions, and nothing else is empty.
    sections = [("tiles", 1.25 * n_tile_rows)]
    if plan["grid"]:
        sections += [("gap", 0.2), ("grid", 0.25 + 0.2 * len(plan["grid"]))]
    if plan["strips"]:
        sections += [("gap", 0.55), ("strips", 1.2 * len(plan["strips"]))]
    top, bottom = 0.5 + 0.16 * (header.count("\n") + 1), 0.25 + 0.14 * (legend.count("\n") + 1)
    height = sum(h for _, h in sections) + top + bottom
    fig = plt.figure(figsize=(12, height))
    outer = fig.add_gridspec(len(sections), 1, height_ratios=[h for _, h in sections], hspace=0.0,
                             top=1 - top / height, bottom=bottom / height, left=0.07, right=0.97)
    specs = {name: outer[i] for i, (name, _) in enumerate(sections) if name != "gap"}
    _draw_tiles(fig, specs["tiles"], answer, plan["neighbours"], load, query_image)
    if "grid" in specs:
        _draw_grid(fig, specs["grid"], plan)
    if "strips" in specs:
        _draw_strips(fig, specs["strips"], plan, store, namer, load, n_strip)
    _text(fig, 0.5, 1 - 0.1 / height, header, ha="center", va="top", fontsize=8)
    _text(fig, 0.01, 0.1 / height, legend, fontsize=7, va="bottom")
    return fig, plan


def _header(answer: dict, plan: dict, reason: str | None) -> str:
    """The sheet's title lines: the neighbourhood in numbers, its labels, predictions, warnings and cuts."""
    u, near = answer["union"], answer["nearest"]
    lines = [f"{answer['space']} neighbours: the {len(answer['neighbours'])} nearest use {u['size']} distinct "
             f"concepts (random neighbourhoods {u['random_mean']:.1f}; {u['percentile']:.0f}% of random ones use "
             f"more); nearest similarity {near['similarity']:.3f} (store rows' median {near['store_median']:.3f})"]
    counts = ", ".join(f"{plain(c['label'], 24)} x{c['n']}" for c in answer["label_counts"][:8])
    more = len(answer["label_counts"]) - 8
    lines.append(f"neighbour labels: {counts}" + (f" and {more} more" if more > 0 else ""))
    p = answer.get("prediction")
    if p:
        lines.append(f"predicted: global head {plain(p['global']['label'], 24)} ({p['global']['probability']:.2f}), "
                     f"local TTT {plain(p['ttt']['label'], 24)}"
                     + (f" ({p['ttt']['probability']:.2f})" if p["ttt"]["probability"] is not None else "")
                     + f", kNN vote {plain(p['knn']['label'], 24)} (probabilities of the predicted class)")
    lines += [f"WARNING: {plain(w)}" for w in answer["warnings"]]
    if plan["cuts"]:
        lines.append("; ".join(plan["cuts"]))
    if reason:
        lines.append(f"images not available: {plain(reason)}")
    return "\n".join(part for line in lines for part in textwrap.wrap(line, 170))


def contact_sheet(answer: dict, store: EmbeddingStore, namer, path: str | Path, **kw) -> dict:
    """Draw the sheet of a ``QueryEngine`` answer to ``path`` (PNG; ``draw_sheet``'s keywords). Returns
    ``{"path", "images_available", "reason", "shown", "cuts"}``."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, f"cannot write the contact sheet {path}: its folder does not exist",
                                str(path))
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"cannot write the contact sheet {path}: a folder has that name",
                                str(path))
    fig, plan = draw_sheet(answer, store, namer, **kw)
    try:
        with atomic_file(path) as f:
            fig.savefig(f, format="png", dpi=110)
    except DiskFullError:
        raise  # already names the sheet and says what to do
    except OSError as e:  # the temporary sibling's name means nothing to the user: name the sheet itself
        raise OSError(e.errno, f"cannot write the contact sheet {path}: {e.strerror or e}", str(path)) from e
    finally:
        plt.close(fig)
    return {"path": str(path), "images_available": plan["reason"] is None, "reason": plan["reason"],
            "shown": plan["shown"], "cuts": plan["cuts"]}


def answer_label(store: EmbeddingStore, row: int) -> str:
    label = int(store.labels[row])
    if label < 0:
        return str(store.ids[row])[-12:]
    return store.classes[label] if label < len(store.classes) else str(label)
