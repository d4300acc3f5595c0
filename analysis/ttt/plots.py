"""Plots of the TTT study: accuracies as dots with 95% intervals (Wilson for accuracies, ±1.96 SE for paired
differences), the paired TTT gains, the neighbourhood-size and train-size curves, locality, the mask histogram.

Colours come from ``analysis.palette``; no axis of an accuracy is cut to exaggerate a difference: accuracies are
dots with intervals (no bars whose length would mean something), and a claim about two methods on the same
points is drawn as their paired difference beside zero.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from analysis.figures import plain_label, save_figure  # noqa: E402
from analysis.palette import NAMES, colour  # noqa: E402
from analysis.stats import Z95, as_proportion  # noqa: E402

MARKERS = {"global": "s", "ttt": "o", "knn": "^"}
SWEEP_METHODS = (("global_acc", "global"), ("ttt_acc", "ttt"), ("majority_acc", "knn"))


def method_key(name: str) -> str:
    """The palette key of a method named in a plot (``global``, ``TTT``, ``kNN majority`` ...)."""
    low = name.lower()
    for word, key in (("majority", "knn"), ("knn", "knn"), ("ttt", "ttt"), ("global", "global")):
        if word in low:
            return key
    raise KeyError(f"no palette colour for the method {name!r}")


def interval_points(m: dict, scale: float = 100.0, proportion: bool = False) -> tuple[float, float, float]:
    """``(value, low, high)`` of a Measure, scaled: a proportion's Wilson interval (``proportion``: treat ``m`` as
    one even when it was written without its interval), else ±1.96 SE."""
    m = as_proportion(m) if proportion else m
    v = float(m["value"])
    if m.get("kind") == "proportion" and m.get("interval"):
        low, high = m["interval"]
    else:
        half = Z95 * float(m.get("se") or 0.0)
        low, high = v - half, v + half
    return scale * v, scale * low, scale * high


def _dots(ax, labels: list[str], measures: list[dict], keys: list[str], proportions: bool = True) -> None:
    """Horizontal dot plot: one row per measure, its 95% interval as a line, its value written above."""
    for i, (m, key) in enumerate(zip(measures, keys)):
        v, low, high = interval_points(m, proportion=proportions)
        ax.errorbar([v], [i], xerr=[[v - low], [high - v]], fmt=MARKERS.get(key, "o"), color=colour(key),
                    capsize=4, markersize=7, linewidth=1.6)
        ax.annotate(f"{v:.1f}", (v, i), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=9)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels([plain_label(t, 40) for t in labels], fontsize=9)
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    ax.tick_params(axis="x", labelsize=9)


def accuracy_bars(measures: dict[str, dict], path: Path, title: str,
                  differences: dict[str, dict] | None = None) -> str:
    """Accuracy of each method (name -> Measure) as a dot with its 95% interval; with ``differences`` (label ->
    paired-difference Measure), a second panel of those paired differences in points beside zero."""
    names = list(measures)
    panels = 2 if differences else 1
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 0.55 * max(len(names), 2) + 1.4), squeeze=False)
    _dots(axes[0, 0], [NAMES.get(method_key(n), n) for n in names], [measures[n] for n in names],
          [method_key(n) for n in names])
    axes[0, 0].set_xlabel("test accuracy (%), 95% Wilson interval", fontsize=9)
    axes[0, 0].set_title(plain_label(title, 80), fontsize=10)
    if differences:
        ax = axes[0, 1]
        labels = list(differences)
        _dots(ax, labels, [differences[k] for k in labels], ["ttt"] * len(labels), proportions=False)
        ax.axvline(0.0, color=colour("bound"), linewidth=1)
        ax.set_xlabel("paired difference on the same test points (points), ±1.96 SE", fontsize=9)
        ax.set_title("TTT against each method, paired", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def sweep_curve(rows: list[dict], key: str, path: Path, xlabel: str, log_x: bool = False) -> str:
    """Global / TTT / majority accuracy (95% intervals) against ``row[key]``, and below it the paired TTT gain over
    the global head (±1.96 SE) when the rows carry it."""
    paired = all("gain" in r for r in rows)
    fig, axes = plt.subplots(2 if paired else 1, 1, figsize=(6.2, 5.4 if paired else 3.6), sharex=True,
                             squeeze=False, gridspec_kw={"height_ratios": [3, 2]} if paired else None)
    x = np.array([r[key] for r in rows], dtype=float)
    ax = axes[0, 0]
    step = 1.03 if log_x else 0.015 * (x.max() - x.min() or 1.0)
    for (name, method), shift in zip(SWEEP_METHODS, (-1, 0, 1)):  # side by side: no interval hides another
        if not all(name in r for r in rows):
            continue
        pts = np.array([interval_points(r[name], proportion=True) for r in rows])
        ax.errorbar(x * step ** shift if log_x else x + shift * step, pts[:, 0], yerr=[pts[:, 0] - pts[:, 1], pts[:, 2] - pts[:, 0]], marker=MARKERS[method],
                    capsize=3, color=colour(method), label=NAMES[method], linewidth=1.5)
    ax.set_ylabel("test accuracy (%), 95% interval", fontsize=9)
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    if paired:
        gains = np.array([interval_points(r["gain"]) for r in rows])
        axes[1, 0].errorbar(x, gains[:, 0], yerr=[gains[:, 0] - gains[:, 1], gains[:, 2] - gains[:, 0]],
                            marker="o", capsize=3, color=colour("ttt"), linewidth=1.5)
        axes[1, 0].axhline(0.0, color=colour("bound"), linewidth=1)
        axes[1, 0].set_ylabel("TTT − global,\npaired (points)", fontsize=9)
        axes[1, 0].grid(alpha=0.3)
    if log_x:
        axes[-1, 0].set_xscale("log")
    axes[-1, 0].set_xticks(x)
    axes[-1, 0].set_xticklabels([f"{v:g}" for v in x])
    axes[-1, 0].minorticks_off()
    axes[-1, 0].set_xlabel(xlabel, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def locality_bars(locality: dict, path: Path) -> str:
    """The locality table as dots on a 0–100 % axis: TTT heads on their own neighbourhood and on the whole test
    set, and the global head on the same test rows."""
    shown = [("TTT head on its own neighbourhood", locality["own_neighbourhood_acc"], "ttt"),
             ("TTT head on the whole test set", locality["whole_test_acc"], "ttt"),
             ("global head on the same test rows", locality["global_whole_test_acc"], "global")]
    fig, ax = plt.subplots(figsize=(6.4, 2.4))
    _dots(ax, [s[0] for s in shown], [s[1] for s in shown], [s[2] for s in shown])
    ax.set_xlim(0, 105)
    ax.set_xlabel("accuracy (%), 95% interval", fontsize=9)
    ax.set_title("Locality: a TTT head is a specialist", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def mask_histogram(kept: np.ndarray, union: np.ndarray, path: Path, lam: float) -> str:
    """How many concepts the learned masks keep, against the neighbourhoods' concept unions (outlines, so that
    neither hides the other)."""
    fig, ax = plt.subplots(figsize=(6.2, 3.4))
    top = int(max(kept.max(initial=0), union.max(initial=0))) + 1
    bins = np.linspace(0, top, min(40, top) + 1)
    ax.hist(union, bins=bins, histtype="step", linewidth=2, color=colour("reconstructions"),
            label=f"concepts in the neighbourhood and query (mean {np.mean(union):.1f})")
    ax.hist(kept, bins=bins, histtype="step", linewidth=2, color=colour("mask_learned"),
            label=f"kept by the learned mask, λ = {lam} (mean {np.mean(kept):.1f})")
    ax.set_xlabel("concepts", fontsize=9)
    ax.set_ylabel("test queries", fontsize=9)
    ax.set_title("O2: a learned mask keeps few of a neighbourhood's concepts", fontsize=10)
    ax.legend(fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
