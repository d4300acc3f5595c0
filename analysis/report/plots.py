"""The report's own plots, drawn from the run's numbers at report time (so they follow the current plot code):
the width scaling figure with its fitted trend, the SAE's training curve and its latent-frequency histogram.
``analysis.report.build.own_plots`` also redraws the TTT study's figures through ``analysis.ttt.plots``, with the
paired differences the report tests. Colours come from ``analysis.palette``; every figure is sized to be shown at
its natural size on the page, with no font under 8 points (12 px)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from analysis.figures import save_figure  # noqa: E402
from analysis.palette import NAMES, colour  # noqa: E402
from analysis.ttt import plots as ttt_plots  # noqa: E402


def _width_axis(ax, xs) -> None:
    """Log x axis ticked at the widths themselves (no crowded minor labels)."""
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("penultimate width of the CNN (features)", fontsize=10)
    ax.tick_params(labelsize=9)
    ax.grid(alpha=0.3)


def plot_width(rows: list[dict], path: Path, slope: dict | None = None, main_width: int | None = None) -> Path:
    """Left: the paired TTT gain (±1.96 SE) per width with the weighted fit of ``slope`` (points per doubling).
    Right: the test error of the global head and of TTT (95% Wilson intervals). ``main_width``: the features of
    the main run's backbone, marked on both."""
    rows = sorted(rows, key=lambda r: r["n_features"])
    xs = [r["n_features"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.4, 3.8))
    gains = np.array([ttt_plots.interval_points(r["gain"]) for r in rows])
    ax1.errorbar(xs, gains[:, 0], yerr=[gains[:, 0] - gains[:, 1], gains[:, 2] - gains[:, 0]], marker="o",
                 capsize=4, color=colour("ttt"), linestyle="none", label="TTT − global head, paired (±1.96 SE)")
    if slope and slope.get("value") is not None:
        # The weighted least-squares line through the weighted means (analysis.report.paper.width_slope).
        w = np.array([1 / max(r["gain"]["se"], 1e-12) ** 2 for r in rows])
        lx = np.log2(xs)
        xm, ym = float((w * lx).sum() / w.sum()), float((w * gains[:, 0]).sum() / w.sum())
        ax1.plot(xs, ym + 100 * slope["value"] * (lx - xm), color=colour("ttt"), linestyle="--", linewidth=1.2,
                 label=f"fit: {100 * slope['value']:+.2f} ± {100 * slope['se']:.2f} points per doubling")
    ax1.axhline(0.0, color=colour("bound"), linewidth=1)
    _width_axis(ax1, xs)
    ax1.set_ylabel("TTT gain (points)", fontsize=10)
    ax1.set_title("Does the TTT gain shrink as the model grows?", fontsize=10)
    ax1.legend(fontsize=9, loc="upper right")
    for key, method, dodge in (("global_acc", "global", 0.96), ("ttt_acc", "ttt", 1.04)):
        pts = np.array([ttt_plots.interval_points(r[key], proportion=True) for r in rows])
        err = 100 - pts  # (error, error at the accuracy's lower bound, error at its upper bound)
        ax2.errorbar([x * dodge for x in xs], err[:, 0], yerr=[err[:, 0] - err[:, 2], err[:, 1] - err[:, 0]],
                     marker=ttt_plots.MARKERS[method], capsize=4, color=colour(method), label=NAMES[method])
    _width_axis(ax2, xs)
    ax2.set_ylabel("test error (%), 95% interval", fontsize=10)
    ax2.set_title("Test error against model width", fontsize=10)
    ax2.legend(fontsize=9)
    if main_width is not None and main_width in xs:
        for ax in (ax1, ax2):
            ax.axvline(main_width, color=colour("bound"), linestyle=":", linewidth=1)
        ax2.annotate("main run's backbone", (main_width, ax2.get_ylim()[1]), textcoords="offset points",
                     xytext=(3, -12), fontsize=8, color=colour("bound"))
    fig.tight_layout()
    return Path(save_figure(fig, path))


def plot_sae_training(history: list[dict], heldout: dict, path: Path) -> Path:
    """The SAE's FVU on its training batches over the steps (log scale) with the held-out FVU at the end, and the
    share of latents counted dead over the steps."""
    steps = [h["step"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.4, 3.2))
    ax1.plot(steps, [h["fvu"] for h in history], color=colour("codes"), marker=".", label="training batches")
    if heldout.get("fvu") is not None and steps:
        ax1.plot([steps[-1]], [heldout["fvu"]], "D", color=colour("reconstructions"),
                 label=f"held-out rows: {heldout['fvu']:.3f}")
    ax1.set_yscale("log")
    ax1.set_xlabel("training step", fontsize=10)
    ax1.set_ylabel("variance unexplained (FVU)", fontsize=10)
    ax1.set_title("SAE training curve", fontsize=10)
    ax1.legend(fontsize=9)
    ax1.grid(alpha=0.3, which="both")
    if all("dead_fraction" in h for h in history):
        ax2.plot(steps, [100 * h["dead_fraction"] for h in history], color=colour("bound"), marker=".")
    ax2.set_ylim(0, 100)
    ax2.set_xlabel("training step", fontsize=10)
    ax2.set_ylabel("latents counted dead (%)", fontsize=10)
    ax2.set_title("Dead latents during training", fontsize=10)
    ax2.grid(alpha=0.3)
    for ax in (ax1, ax2):
        ax.tick_params(labelsize=9)
    fig.tight_layout()
    return Path(save_figure(fig, path))


def plot_latent_frequency(freq_hist: dict, n_rows: int | None, path: Path) -> Path:
    """How often each latent fires on held-out rows: a histogram over log10 of the firing share, with the latents
    that never fired as a bar of their own (their log is minus infinity)."""
    counts, edges = np.asarray(freq_hist["counts"]), np.asarray(freq_hist["log10_edges"], dtype=float)
    used = np.nonzero(counts)[0]
    lo = max(int(used.min()) - 1, 0) if used.size else 0
    hi = min(int(used.max()) + 2, len(counts)) if used.size else len(counts)
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    width = edges[1] - edges[0]
    ax.bar(edges[lo:hi], counts[lo:hi], width=width, align="edge", color=colour("codes"), alpha=0.85,
           label="latents that fire")
    never = int(freq_hist.get("n_never_fired") or 0)
    x_never = edges[lo] - 2 * width
    ax.bar([x_never], [never], width=width, align="edge", color=colour("bound"), label="never fired")
    ax.annotate(str(never), (x_never + width / 2, never), textcoords="offset points", xytext=(0, 2), ha="center",
                fontsize=9)
    ticks = [t for t in np.arange(math.ceil(edges[lo]), edges[hi] + 1e-9, 1.0)]
    ax.set_xticks([x_never + width / 2] + ticks)
    ax.set_xticklabels(["never"] + [f"{10 ** t:g}" for t in ticks], fontsize=9)
    ax.set_ylim(0, max(never, int(counts.max(initial=0))) * 1.15 + 1)
    ax.set_xlabel("share of held-out images a latent fires on (log scale)" +
                  (f", {n_rows} images" if n_rows else ""), fontsize=10)
    ax.set_ylabel("latents", fontsize=10)
    ax.set_title("Latent firing frequency", fontsize=10)
    ax.legend(fontsize=9)
    fig.tight_layout()
    return Path(save_figure(fig, path))
