"""One way to write a matplotlib figure: PNG through matplotlib's Agg backend (no display needed), written
atomically so that a killed run never leaves a half-written plot, and closed so that figures do not pile up."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from artifacts import atomic_file  # noqa: E402

DPI = 110


def save_figure(fig, path: str | os.PathLike, dpi: int = DPI) -> str:
    """Write ``fig`` to ``path`` as PNG (tight bounding box), close it, return the path as a string."""
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return str(path)
