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

from analysis.figures import plain_label, save_figure  # noqa: E402
from analysis.palette import LINESTYLES, NAMES, colour  # noqa: E402


def series_key(name: str) -> str:
    """The palette key of a union or cosine series named by the study (``neighbours in codes``, ``random
    baseline``, ``same_label`` ...)."""
    low = name.lower().replace("-", "_")
    for key in ("same_label", "random", "reconstructions", "embeddings", "codes"):
        if key in low:
            return key
    raise KeyError(f"no palette colour for the series {name!r}")


def union_reach(bounds: dict) -> tuple[int, str]:
    """The largest union a neighbourhood can actually reach, and why: ``n_neighbours·k``, or the number of live
    latents (those that fire on some training row) when the dictionary has fewer."""
    top = int(bounds["max"])
    live = bounds.get("n_live")
    if live is not None and int(live) < top:
        return int(live), f"{int(live)} live concepts: the whole usable dictionary"
    return top, f"n_neighbours·k = {top}: every neighbour uses other concepts"


def plot_unions(unions: dict[str, np.ndarray], bounds: dict, path: Path) -> str:
    """One histogram per space and baseline of the neighbourhoods' union sizes (one panel each, so none hides
    another), between ``k`` (all neighbours share) and the union a neighbourhood can reach (``union_reach``)."""
    lo, (reach, why) = int(bounds["min"]), union_reach(bounds)
    names = list(unions)
    fig, axes = plt.subplots(len(names), 1, figsize=(7.2, 1.05 * len(names) + 1.6), sharex=True, squeeze=False,
                             layout="constrained")
    edges = np.arange(0, reach + 2) - 0.5 if reach <= 120 else np.linspace(0, reach, 61)
    for ax, name in zip(axes[:, 0], names):
        values, key = np.asarray(unions[name]), series_key(name)
        ax.hist(values, bins=edges, color=colour(key), alpha=0.85)
        ax.set_title(f"{NAMES[key]}: mean {np.mean(values):.1f} concepts (n = {len(values)} neighbourhoods)",
                     fontsize=9, loc="left", pad=2)
        for x in (lo, reach):
            ax.axvline(x, color=colour("bound"), linestyle=":", linewidth=1.2)
        ax.tick_params(labelsize=8)
        ax.set_ylabel("count", fontsize=8)
    axes[0, 0].set_xlim(0, reach * 1.04 + 1)
    axes[-1, 0].set_xlabel(f"distinct active concepts in a neighbourhood (dotted: k = {lo} if all share; {why})",
                           fontsize=9)
    note = saturation_note(unions, bounds)
    fig.suptitle("How many concepts do neighbourhoods use?" + (f"\n{note}" if note else ""), fontsize=10)
    return save_figure(fig, path)


def saturation_note(unions: dict[str, np.ndarray], bounds: dict) -> str | None:
    """A sentence when the random baseline uses (nearly) every concept it can reach: its distance from the
    neighbourhoods then understates how few concepts they share."""
    reach, _ = union_reach(bounds)
    random = [np.mean(v) for name, v in unions.items() if series_key(name) == "random"]
    if random and random[0] >= 0.9 * reach:
        return (f"random sets use {random[0]:.0f} of the {reach} concepts they can reach: the baseline saturates "
                "the dictionary")
    return None


def plot_o1(cosines: dict[str, np.ndarray], path: Path) -> str:
    """O1: the distribution (cumulative, so that the many exact zeros of the baselines flatten nothing) of the
    concept-space cosine between a query and its neighbours, per way of choosing the neighbours."""
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    low = min(0.0, min(float(c.min()) for c in cosines.values()))
    for name, values in cosines.items():
        key = series_key(name)
        v = np.sort(np.asarray(values, dtype=np.float64).ravel())
        share = np.arange(1, v.size + 1) / v.size
        zero = float(np.mean(v == 0.0))
        ax.step(np.r_[low, v], np.r_[0.0, share], where="post", color=colour(key), linestyle=LINESTYLES[key],
                linewidth=1.8, label=f"{NAMES[key]}: mean {v.mean():.3f}, {zero:.0%} share no concept")
    ax.set_xlim(low, 1.0)
    ax.set_ylim(0, 1.0)
    ax.set_xlabel("cosine of the SAE codes of a test image and one of its neighbours")
    ax.set_ylabel("share of neighbours at or below")
    ax.set_title("O1: concept similarity of a test image and its neighbours, by how they were chosen", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    return save_figure(fig, path)


def umap_embed(points: np.ndarray, seed: int, max_points: int) -> tuple[np.ndarray, np.ndarray, str]:
    """2-d UMAP of ``points`` (cosine metric): ``(coords, rows used, note)``; a seeded sample beyond
    ``max_points``."""
    import warnings

    with warnings.catch_warnings():  # umap's note that TensorFlow (for ParametricUMAP) is absent: nothing to act on
        warnings.filterwarnings("ignore", message="Tensorflow not installed", category=ImportWarning)
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


def plot_umap(coords: np.ndarray, colours, title: str, path: Path, legend: list[str] | None = None,
              colour_label: str | None = None) -> str:
    """A UMAP map coloured by class (``legend``: the class names, drawn as plain text) or by a number."""
    fig, ax = plt.subplots(figsize=(6, 6))
    scatter = ax.scatter(coords[:, 0], coords[:, 1], c=colours, s=3, cmap="tab10" if legend else "viridis")
    if legend:
        handles = [plt.Line2D([], [], marker="o", linestyle="", color=scatter.cmap(scatter.norm(i)),
                              label=plain_label(name, 28)) for i, name in enumerate(legend[:20])]
        ax.legend(handles=handles, fontsize=8, markerscale=1.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        fig.colorbar(scatter, ax=ax, shrink=0.7, label=colour_label)
    ax.set_title(plain_label(title, 120), fontsize=9)
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
                                    out_dir / "umap_atoms.png", colour_label="log10 share of images it fires on")
    coords, rows, x_note = umap_embed(store.x, config.seed, config.umap_max_points)
    labels = store.labels[rows]
    labelled = (labels >= 0).all() and len(store.classes) <= 20
    colours = labels if labelled else np.where(labels >= 0, labels, -1)
    plots["umap_embeddings"] = plot_umap(coords, colours, f"UMAP of the embeddings by label ({x_note})",
                                         out_dir / "umap_embeddings.png", store.classes if labelled else None)
    plots["umap_note"] = {"atoms": atoms_note, "embeddings": x_note}
    return plots
