"""Contact sheets: the query image, its neighbours, and for its top concepts a strip of their top images.

Images come from the store's source: the bundled digits (ids are dataset rows), or image files whose ids are
paths relative to the source root recorded in the store's meta. When they cannot be had (a store of another
kind, or one moved away from its images) the tile says so and ``images_available`` tells the caller.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from artifacts import atomic_file  # noqa: E402
from embeddings.store import EmbeddingStore  # noqa: E402

def image_loader(store: EmbeddingStore) -> tuple[Callable[[int], Image.Image | None], str | None]:
    """``(load(row) -> RGB image or None, reason)``; ``reason`` says why no image can be shown, else ``None``."""
    source = store.meta.get("source") or {}
    kind = source.get("kind")
    if kind == "digits":
        from embeddings.digits import load_digits_images

        images, _ = load_digits_images(int(source.get("size", 32)))

        def load_digit(row: int) -> Image.Image | None:
            i = int(store.ids[row])
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
        path = Path(store.ids[row])
        try:
            return load_rgb(path if path.is_absolute() else root / path)
        except BadImage:
            return None

    return load_file, None


def _tile(ax, image: Image.Image | None, caption: str, missing: str = "no image") -> None:
    ax.set_xticks([]), ax.set_yticks([])
    if image is None:
        ax.text(0.5, 0.5, missing, ha="center", va="center", fontsize=6, wrap=True, transform=ax.transAxes)
        ax.set_facecolor("#eeeeee")
    else:
        ax.imshow(np.asarray(image), cmap="gray")
    ax.set_title(caption, fontsize=6)


def contact_sheet(answer: dict, store: EmbeddingStore, namer, path: str | Path, *, query_image=None,
                  n_concepts: int = 5, n_strip: int = 8, n_neighbours: int = 12) -> dict:
    """Draw the sheet of a ``QueryEngine`` answer to ``path`` (PNG). Returns ``{"path", "images_available",
    "reason"}``. ``query_image`` is the PIL image of a ``--image`` query (store rows load their own)."""
    load, reason = image_loader(store)
    neighbours = answer["neighbours"][:n_neighbours]
    concepts = sorted(answer["concepts"], key=lambda c: -c["activation"])[:n_concepts]
    n_cols = max(len(neighbours) + 1, n_strip + 1)
    fig, axes = plt.subplots(1 + len(concepts), n_cols, figsize=(1.1 * n_cols, 1.35 * (1 + len(concepts))),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    q = answer["query"]
    image = query_image if query_image is not None else (load(q["row"]) if q["row"] is not None else None)
    axes[0, 0].axis("on")
    where = f"row {q['row']}" if q["row"] is not None else Path(q["image_path"] or "").name
    _tile(axes[0, 0], image, f"QUERY {q['label'] or ''}\n{where}")
    for j, nb in enumerate(neighbours, start=1):
        axes[0, j].axis("on")
        _tile(axes[0, j], load(nb["row"]), f"#{nb['rank']} {nb['label'] or nb['id']}\n{nb['similarity']:.3f}")
    for i, concept in enumerate(concepts, start=1):
        info = namer.describe(concept["latent"], n_top=n_strip)
        axes[i, 0].text(0.0, 0.5, f"concept {concept['latent']}\nact {concept['activation']:.2f}\n"
                        f"freq {concept['frequency']:.1%}", fontsize=6, va="center", transform=axes[i, 0].transAxes)
        for j, (row, value) in enumerate(zip(info["top_rows"], info["top_values"]), start=1):
            axes[i, j].axis("on")
            label = answer_label(store, row)
            _tile(axes[i, j], load(row), f"{label} {value:.2f}")
    title = f"{answer['space']} neighbours; union {answer['union']['size']} concepts " \
            f"(random {answer['union']['random_mean']:.1f}, percentile {answer['union']['percentile']:.0f})"
    if reason:
        title += "\n" + "\n".join(textwrap.wrap(f"images not available: {reason}", 110))
    fig.suptitle(title, fontsize=8)
    height = fig.get_size_inches()[1]
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - (0.55 + 0.2 * title.count("\n")) / height,
                        wspace=0.15, hspace=0.6)
    path = Path(path)
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return {"path": str(path), "images_available": reason is None, "reason": reason}


def answer_label(store: EmbeddingStore, row: int) -> str:
    label = int(store.labels[row])
    if label < 0:
        return str(store.ids[row])[-12:]
    return store.classes[label] if label < len(store.classes) else str(label)
