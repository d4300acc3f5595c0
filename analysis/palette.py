"""One colour per method, space and baseline, the same in every figure of the toolkit.

Colours are Okabe and Ito's colour-blind-safe set ("Color Universal Design", 2008) with three of Paul Tol's
where that set runs out; a figure never picks its own colour for a thing named here, so "TTT" is the same blue in
the TTT study, the width sweep, the theory plots and the report.
"""

from __future__ import annotations

COLOURS = {
    # methods
    "global": "#6b6b6b",          # the globally trained head
    "ttt": "#0072B2",             # local test-time training
    "knn": "#D55E00",             # kNN majority vote (kNN mean in the theory model)
    "ttt_converged": "#56B4E9",   # local ERM run to convergence (theory)
    # concept masks of code-space TTT
    "mask_none": "#0072B2",       # no mask: plain TTT on the codes
    "mask_query": "#CC79A7",      # the query's own concepts
    "mask_learned": "#E69F00",    # the learned mask
    # spaces where neighbours are found
    "embeddings": "#009E73",
    "reconstructions": "#AA4499",
    "codes": "#332288",
    # baselines of the concept study
    "random": "#999933",
    "same_label": "#882255",
    # marks
    "bound": "#4d4d4d",           # bounds and reference lines
    "paper": "#000000",           # a value or curve from the paper
}
"""Name -> hex colour."""

NAMES = {
    "global": "global head", "ttt": "TTT", "knn": "kNN majority vote", "ttt_converged": "local ERM, converged",
    "mask_none": "no mask", "mask_query": "the query's own concepts", "mask_learned": "learned mask",
    "embeddings": "neighbours in the embeddings", "reconstructions": "neighbours in the SAE reconstructions",
    "codes": "neighbours in the SAE codes", "random": "random training images",
    "same_label": "random training images of the same label",
}
"""Name -> the words a legend uses for it."""

LINESTYLES = {"embeddings": "-", "reconstructions": "--", "codes": ":", "random": "-.", "same_label": (0, (5, 1, 1, 1))}
"""Line styles of the spaces and baselines, so that curves drawn on top of each other stay distinguishable."""


def colour(name: str) -> str:
    """The colour of ``name`` (a key of ``COLOURS``); an unknown name is an error, never a silent default."""
    try:
        return COLOURS[name]
    except KeyError:
        raise KeyError(f"no palette colour for {name!r}; add it to analysis/palette.py") from None
