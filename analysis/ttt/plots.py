"""Plots of the TTT study: accuracies with error bars, the neighbourhood-size curve, locality, mask histogram."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from analysis.figures import save_figure  # noqa: E402


def accuracy_bars(measures: dict[str, dict], path: Path, title: str) -> str:
    """One bar per method (name -> Measure), error bars of one standard error."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = list(measures)
    values = [measures[k]["value"] for k in names]
    errors = [measures[k]["se"] or 0.0 for k in names]
    ax.bar(names, values, yerr=errors, capsize=4, color=["#888", "#2a7", "#c74", "#47c"][: len(names)])
    lo = min(v - e for v, e in zip(values, errors))
    ax.set_ylim(max(0.0, lo - 0.05), min(1.0, max(v + e for v, e in zip(values, errors)) + 0.03))
    ax.set_ylabel("accuracy (± 1 s.e.)")
    ax.set_title(title)
    return save_figure(fig, path)


def sweep_curve(rows: list[dict], key: str, path: Path, xlabel: str, log_x: bool = False) -> str:
    """Global / TTT / majority accuracy (± s.e.) against ``row[key]``."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    x = [r[key] for r in rows]
    for name, label in (("global_acc", "global"), ("ttt_acc", "TTT"), ("majority_acc", "kNN majority")):
        y = np.array([r[name]["value"] for r in rows])
        e = np.array([r[name]["se"] or 0.0 for r in rows])
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=label)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (± 1 s.e.)")
    ax.legend()
    return save_figure(fig, path)


def locality_bars(locality: dict, path: Path) -> str:
    """The locality table as bars: TTT heads on their own neighbourhood and on the whole test set."""
    shown = {"own neighbourhood": locality["own_neighbourhood_acc"], "whole test set": locality["whole_test_acc"],
             "global head, test set": locality["global_whole_test_acc"]}
    return accuracy_bars(shown, path, "Locality of the TTT heads")


def mask_histogram(kept: np.ndarray, union: np.ndarray, path: Path, lam: float) -> str:
    """How many concepts the learned masks keep, against the neighbourhoods' concept unions."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    top = int(max(kept.max(initial=0), union.max(initial=0))) + 1
    bins = np.linspace(0, top, min(40, top) + 1)
    ax.hist(union, bins=bins, alpha=0.6, label="concepts in the neighbourhood")
    ax.hist(kept, bins=bins, alpha=0.8, label=f"kept by the learned mask (λ={lam})")
    ax.set_xlabel("concepts")
    ax.set_ylabel("queries")
    ax.legend()
    return save_figure(fig, path)
