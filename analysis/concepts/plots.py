"""Plots of the concept study: union-size histograms against the baselines, the O1 cosine distributions, and
UMAP maps of the SAE's decoder atoms and of the embeddings coloured by label.

UMAP (umap-learn) is imported only when a map is drawn: its import and first run compile with numba and take
seconds. More than ``umap_max_points`` points are replaced by a seeded sample, and the figure's title says so.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from analysis.figures import save_figure  # noqa: E402


def plot_unions(unions: dict[str, np.ndarray], bounds: dict, path: Path) -> str:
    """Histograms of the neighbourhoods' union sizes, one per space and baseline, with the bounds marked."""
    fig, ax = plt.subplots(figsize=(7, 4))
    lo, hi = bounds["min"], bounds["max"]
    edges = np.linspace(lo, max(hi, lo + 1), 41) if hi - lo > 40 else np.arange(lo, hi + 2) - 0.5
    for name, values in unions.items():
        ax.hist(values, bins=edges, histtype="step", linewidth=1.5,
                label=f"{name} (mean {np.mean(values):.1f}, n={len(values)})")
    for x, text in ((lo, "k: all share"), (hi, "n_neighbours·k: disjoint")):
        ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        ax.text(x, ax.get_ylim()[1] * 0.95, text, rotation=90, va="top", ha="right", fontsize=8, color="grey")
    ax.set_xlabel("distinct active concepts in a neighbourhood (union of supports)")
    ax.set_ylabel("neighbourhoods")
    ax.set_title("How many concepts do neighbourhoods use?")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_o1(cosines: dict[str, np.ndarray], path: Path) -> str:
    """Distributions of concept-space cosine between a query and its neighbours, per way of choosing them."""
    fig, ax = plt.subplots(figsize=(7, 4))
    edges = np.linspace(min(0.0, min(float(c.min()) for c in cosines.values())), 1.0, 51)
    for name, values in cosines.items():
        ax.hist(values.ravel(), bins=edges, histtype="step", density=True, linewidth=1.5,
                label=f"{name} (mean {values.mean():.3f})")
    ax.set_xlabel("cos(Φ̂(query), Φ̂(neighbour))")
    ax.set_ylabel("density")
    ax.set_title("O1: concept similarity of neighbours chosen in each space")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def umap_embed(points: np.ndarray, seed: int, max_points: int) -> tuple[np.ndarray, np.ndarray, str]:
    """2-d UMAP of ``points`` (cosine metric): ``(coords, rows used, note)``; a seeded sample beyond
    ``max_points``."""
    import umap

    n = len(points)
    rows = np.arange(n)
    note = f"all {n} points"
    if n > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
        note = f"a seeded sample of {max_points} of {n} points (seed {seed})"
    x = np.asarray(points[rows], dtype=np.float32)
    reducer = umap.UMAP(n_components=2, metric="cosine", random_state=seed, n_jobs=1,
                        n_neighbors=min(15, len(x) - 1))
    return reducer.fit_transform(x), rows, note


def plot_umap(coords: np.ndarray, colours, title: str, path: Path, legend: list[str] | None = None) -> str:
    fig, ax = plt.subplots(figsize=(6, 6))
    scatter = ax.scatter(coords[:, 0], coords[:, 1], c=colours, s=3, cmap="tab10" if legend else "viridis")
    if legend:
        handles = [plt.Line2D([], [], marker="o", linestyle="", color=scatter.cmap(scatter.norm(i)), label=name)
                   for i, name in enumerate(legend[:20])]
        ax.legend(handles=handles, fontsize=7, markerscale=1.5, loc="best")
    else:
        fig.colorbar(scatter, ax=ax, shrink=0.7)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([]), ax.set_yticks([])
    return save_figure(fig, path)


def draw_all(out_dir: Path, unions: dict, bounds: dict, cosines: dict, store, sae, config,
             atom_frequency: np.ndarray) -> dict:
    """Every plot of the study into ``out_dir``; returns name -> path (and ``umap_note``). Atoms are coloured
    by log10 of their firing frequency (dead atoms at the bottom of the scale)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {"union_hist": plot_unions(unions, bounds, out_dir / "union_hist.png"),
             "o1_cosines": plot_o1(cosines, out_dir / "o1_cosines.png")}
    if not config.umap:
        return plots
    atoms = sae.decoder_weight().detach().cpu().numpy()
    coords, rows, atoms_note = umap_embed(atoms, config.seed, config.umap_max_points)
    floor = 0.5 / max(store.n, 1)
    plots["umap_atoms"] = plot_umap(coords, np.log10(np.maximum(atom_frequency[rows], floor)),
                                    f"UMAP of the {len(atoms)} decoder atoms, colour: log10 firing frequency "
                                    f"({atoms_note})",
                                    out_dir / "umap_atoms.png")
    coords, rows, x_note = umap_embed(store.x, config.seed, config.umap_max_points)
    labels = store.labels[rows]
    labelled = (labels >= 0).all() and len(store.classes) <= 20
    colours = labels if labelled else np.where(labels >= 0, labels, -1)
    plots["umap_embeddings"] = plot_umap(coords, colours, f"UMAP of the embeddings by label ({x_note})",
                                         out_dir / "umap_embeddings.png", store.classes if labelled else None)
    plots["umap_note"] = {"atoms": atoms_note, "embeddings": x_note}
    return plots
