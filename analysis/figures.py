"""One way to write a matplotlib figure, and one way to put the data's own words on it.

``save_figure`` writes PNG through matplotlib's Agg backend (no display needed), atomically so that a killed run
never leaves a half-written plot, closes the figure so that figures do not pile up, and records in the PNG the
smallest font the figure uses, in pixels at its natural size (``min_font_px``): the report shows a figure no
smaller than keeps that font legible. ``plain_label`` makes any text from the data (class names, ids) safe to
draw: matplotlib reads ``$...$`` as math, and a class named ``$\\frac$`` would stop the plot.
"""

from __future__ import annotations

import os
import unicodedata

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from PIL import Image  # noqa: E402

from artifacts import atomic_file  # noqa: E402

DPI = 110
MIN_FONT_KEY = "min_font_px"
"""The PNG text chunk that holds the smallest font of the figure, in pixels at natural size."""
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
"""Characters that reorder the text around them (U+202E turns "abc" into "cba" on screen)."""


def save_figure(fig, path: str | os.PathLike, dpi: int = DPI) -> str:
    """Write ``fig`` to ``path`` as PNG (tight bounding box) with its ``min_font_px``, close it, return the path."""
    fig.canvas.draw()
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    metadata = {MIN_FONT_KEY: f"{min(sizes) * dpi / 72:.2f}"} if sizes else None
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight", metadata=metadata)
    plt.close(fig)
    return str(path)


def min_font_px(path: str | os.PathLike) -> float | None:
    """The ``min_font_px`` a PNG written by ``save_figure`` records, or None (another writer, or no text)."""
    try:
        with Image.open(path) as im:
            value = (getattr(im, "text", None) or {}).get(MIN_FONT_KEY)
    except OSError:
        return None
    try:
        return float(value) if value else None
    except ValueError:
        return None


def plain_text(text, max_chars: int | None = None) -> str:
    """Any value as plain, displayable text: bytes that were not UTF-8 (surrogate escapes) as ``\\xNN``, controls
    and direction overrides as visible ``<U+202E>`` marks, cut to ``max_chars`` with an ellipsis."""
    s = str(text)
    try:  # bytes a file name held that were not UTF-8 arrive as surrogate escapes: shown as \xNN
        s = s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # other lone surrogates
        s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    out = []
    for c in s:
        if c in BIDI_CONTROLS or (unicodedata.category(c) == "Cc" and c not in "\t\n"):
            out.append(f"<U+{ord(c):04X}>")
        else:
            out.append(c)
    s = "".join(out)
    if max_chars is not None and len(s) > max_chars:
        s = s[: max(max_chars - 1, 1)] + "…"
    return s


def plain_label(text, max_chars: int = 40) -> str:
    """``plain_text`` for a figure: short, and with every ``$`` escaped so that matplotlib never parses math."""
    return plain_text(text, max_chars).replace("$", r"\$")
