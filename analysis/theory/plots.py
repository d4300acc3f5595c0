"""Plots of the theory experiment: error against d2 with the paper's 1 − d2/d1 curve, TTT error against the
neighbourhood size, the two regimes side by side, and TTT error against s and σ. Error bars are ±1 SE."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from analysis.theory.model import ConceptModelConfig, global_error_claim  # noqa: E402
from analysis.figures import save_figure  # noqa: E402
from analysis.palette import colour  # noqa: E402

STYLE = {"global": ("global head", colour("global"), "s"),
         "ttt": ("local TTT (paper: 50 steps)", colour("ttt"), "o"),
         "knn": ("kNN mean", colour("knn"), "^"),
         "ttt_converged": ("local ERM, converged", colour("ttt_converged"), "D")}
"""Label, colour (``analysis.palette``: the same as in every other figure) and marker of each method."""
TITLES = {"locally_sparse": "locally sparse (semantic clusters)", "isotropic": "isotropic supports"}


def _series(ax, rows: list[dict], x_key: str, names=("global", "ttt", "ttt_converged", "knn")) -> None:
    x = np.array([r[x_key] for r in rows], dtype=float)
    for name in names:
        if not all(name in r for r in rows):
            continue
        label, color, marker = STYLE[name]
        y = np.array([r[name]["value"] for r in rows])
        se = np.array([r[name]["se"] or 0.0 for r in rows])
        ax.errorbar(x, y, yerr=se, label=label, color=color, marker=marker, capsize=3, linewidth=1.2)


def plot_d2(sweeps: dict, m: ConceptModelConfig, path: Path) -> str:
    """Error against d2 per regime, with the paper's 1 − d2/d1 and the draws' exact best-linear error."""
    fig, axes = plt.subplots(1, len(sweeps), figsize=(6 * len(sweeps), 4.2), sharey=True)
    for ax, (name, rows) in zip(np.atleast_1d(axes), sweeps.items()):
        grid = np.linspace(min(r["d2"] for r in rows), m.d1, 200)
        ax.plot(grid, [global_error_claim(m.d1, d) for d in grid], "--", color=colour("paper"), linewidth=1,
                label="paper: 1 − d2/d1")
        if all("population" in r for r in rows):
            ax.plot([r["d2"] for r in rows], [r["population"]["value"] for r in rows], color=colour("bound"),
                    linestyle=":", marker=".", label="exact best linear (per draw)")
        _series(ax, rows, "d2")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"feature width d2 (d1 = {m.d1} concepts, s = {m.s})")
        ax.set_title(TITLES.get(name, name))
        ax.grid(alpha=0.3)
    axes = np.atleast_1d(axes)
    axes[0].set_ylabel(f"test error vs noiseless target (Var f = 1, σ = {m.noise})")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Global head vs local TTT ({m.n_train} train points, {rows[0]['n_neighbours']} neighbours)")
    return save_figure(fig, path)


def plot_neighbours(sweeps: dict, m: ConceptModelConfig, path: Path) -> str:
    """TTT (and kNN) error against n_neighbours per regime, the global head as a line, and the rate scale."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for name, rows in sweeps.items():
        ks = np.array([r["n_neighbours"] for r in rows], dtype=float)
        dash = "-" if name == "locally_sparse" else "--"
        for key in ("ttt", "ttt_converged", "knn"):
            if not all(key in r for r in rows):
                continue
            label, color, marker = STYLE[key]
            ax.errorbar(ks, [r[key]["value"] for r in rows], yerr=[r[key]["se"] or 0.0 for r in rows],
                        color=color, marker=marker, linestyle=dash, capsize=3, label=f"{label}, {TITLES[name]}")
        ax.axhline(rows[0]["global"]["value"], color=colour("global"), linestyle=dash, linewidth=1,
                   label=f"global head, {TITLES[name]}")
    rows = sweeps["locally_sparse"]
    ks = np.array([r["n_neighbours"] for r in rows], dtype=float)
    ax.plot(ks, m.noise ** 2 * m.s * math.log(m.d1 / m.s) / ks, ":", color=colour("paper"),
            label="σ² s log(d1/s) / n_neighbours")
    ax.axvline(m.n_train / m.n_clusters, color=colour("bound"), linewidth=0.8)
    ax.text(m.n_train / m.n_clusters, ax.get_ylim()[1], " cluster size", va="top", fontsize=8, color=colour("bound"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("n_neighbours")
    ax.set_ylabel("test error")
    ax.set_title(f"TTT error against neighbourhood size (d2 = {m.d2}, d1 = {m.d1}, s = {m.s}, σ = {m.noise})")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, which="both")
    return save_figure(fig, path)


def plot_regimes(regimes: dict, m: ConceptModelConfig, path: Path) -> str:
    """Bars of global / TTT / kNN error in both regimes at the base d2, with each neighbourhood's concept union."""
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(regimes)
    width = 0.26
    for i, key in enumerate(("global", "ttt", "knn")):
        label, color, _ = STYLE[key]
        vals = [regimes[n][key]["value"] for n in names]
        ses = [regimes[n][key]["se"] or 0.0 for n in names]
        ax.bar(np.arange(len(names)) + (i - 1) * width, vals, width, yerr=ses, capsize=3, color=color, label=label)
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels([f"{TITLES[n]}\nunion of concepts over a neighbourhood: {regimes[n]['union']['value']:.0f}"
                        for n in names], fontsize=8)
    ax.axhline(global_error_claim(m.d1, m.d2), color=colour("paper"), linestyle="--", linewidth=1,
               label="paper: 1 − d2/d1")
    ax.set_ylabel("test error")
    ax.set_title(f"Isotropic vs locally sparse concepts (d2 = {m.d2}, d1 = {m.d1}, s = {m.s})")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_s_noise(s_rows: list[dict], noise_rows: list[dict], m: ConceptModelConfig, path: Path) -> str:
    """TTT and global error against the sparsity s and the noise σ (locally sparse regime, base d2)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, rows, key, xlabel in ((axes[0], s_rows, "s", "active concepts per input s"),
                                  (axes[1], noise_rows, "noise", "target noise σ")):
        _series(ax, rows, key)
        ax.set_xlabel(xlabel)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("test error")
    fig.suptitle(f"Locally sparse regime, d2 = {m.d2}, d1 = {m.d1}, {s_rows[0]['n_neighbours']} neighbours")
    return save_figure(fig, path)
