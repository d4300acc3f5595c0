"""The report's own plots (PNG, matplotlib's Agg backend): accuracies with error bars, the neighbourhood-size
sweep and the width scaling curve. The studies draw their own plots (O1, union histograms, UMAP); the report
embeds those as they are."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from analysis.figures import save_figure  # noqa: E402



def _se(m: dict) -> float:
    return 0.0 if m.get("se") is None else float(m["se"])


def plot_accuracies(named: dict[str, dict], path: Path, title: str) -> Path:
    """Bars of accuracy Measures (``{label: {"value","se","n"}}``) with ±1 SE error bars, in percent."""
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    labels = list(named)
    values = [100 * named[k]["value"] for k in labels]
    errors = [100 * _se(named[k]) for k in labels]
    colours = ["#8a8a8a", "#2f6db5", "#c2572b", "#4f9a4f", "#8b5fb0"][: len(labels)]
    ax.bar(labels, values, yerr=errors, capsize=5, color=colours)
    low = min(v - e for v, e in zip(values, errors))
    ax.set_ylim(max(0.0, low - 5), min(100.0, max(v + e for v, e in zip(values, errors)) + 2))
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("accuracy (%) ± 1 SE")
    ax.set_title(title, fontsize=10)
    return Path(save_figure(fig, path))


def plot_n_neighbours(rows: list[dict], path: Path) -> Path:
    """TTT, global and majority accuracy against the neighbourhood size (rows with ``n_neighbours`` and Measures)."""
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    xs = [r["n_neighbours"] for r in rows]
    for key, label, colour in (("ttt_acc", "TTT", "#2f6db5"), ("global_acc", "global", "#8a8a8a"),
                               ("majority_acc", "majority vote", "#c2572b")):
        if all(key in r for r in rows):
            ax.errorbar(xs, [100 * r[key]["value"] for r in rows], yerr=[100 * _se(r[key]) for r in rows],
                        marker="o", capsize=3, label=label, color=colour)
    ax.set_xscale("log")
    ax.set_xlabel("neighbourhood size (n_neighbours)")
    ax.set_ylabel("test accuracy (%) ± 1 SE")
    ax.legend(fontsize=8)
    ax.set_title("Neighbourhood-size sweep", fontsize=10)
    return Path(save_figure(fig, path))


def _width_axis(ax, xs) -> None:
    """Log x axis ticked at the widths themselves (no crowded minor labels)."""
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("penultimate width (features)")


def plot_width(rows: list[dict], path: Path) -> Path:
    """The TTT gain (paired, TTT minus global, in points) and the global error against the backbone's width."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.6, 4.0))
    xs = [r["n_features"] for r in rows]
    ax1.errorbar(xs, [100 * r["gain"]["value"] for r in rows], yerr=[100 * _se(r["gain"]) for r in rows],
                 marker="o", capsize=3, color="#2f6db5")
    ax1.axhline(0.0, color="#999999", lw=0.8)
    _width_axis(ax1, xs)
    ax1.set_ylabel("TTT gain (points) ± 1 SE")
    ax1.set_title("TTT gain vs model width", fontsize=10)
    for key, label, colour in (("global_acc", "global", "#8a8a8a"), ("ttt_acc", "TTT", "#2f6db5")):
        ax2.errorbar(xs, [100 * (1 - r[key]["value"]) for r in rows], yerr=[100 * _se(r[key]) for r in rows],
                     marker="o", capsize=3, label=label, color=colour)
    _width_axis(ax2, xs)
    ax2.set_ylabel("test error (%) ± 1 SE")
    ax2.legend(fontsize=8)
    ax2.set_title("Error vs model width", fontsize=10)
    return Path(save_figure(fig, path))
