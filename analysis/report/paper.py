"""The paper's values (see PAPER.md for where each comes from) and the verdicts that compare a run with them.

Two kinds of comparison:

- against a number: only when the run's data is the paper's (``analysis.report.datasets``: MNIST recognised by
  its files' hashes for the ``mnist`` preset; ImageNet-1k for ``imagenet-clip``), our Measure and the paper's
  value give "agrees within error" when they differ by at most two combined standard errors, else "differs by X"
  in the unit of the measure (points for accuracies, concepts for counts);
- against a direction: every run checks the paper's qualitative claims with a one-sided two-SE test. A claim
  about two methods on the same test points (TTT against the global head, against kNN majority vote; a TTT
  head on its own neighbourhood against the test set) is tested on their paired difference; the width claim by
  the slope of the gain over every width, not its two ends.
"""

from __future__ import annotations

import math

from analysis.stats import verdict_se

AGREE_Z = 2.0
"""Differences within this many combined standard errors count as agreement."""
NO_SE = "inconclusive (no standard error: a single sample)"
"""The verdict on a measure of one item (``analysis.stats.measure`` gives it ``se`` None: unknown, not zero)."""


def _pct(value: float, se: float | None = None) -> dict:
    return {"value": value / 100, "se": None if se is None else se / 100}


PAPER_VALUES = {
    "mnist": {
        "ttt.global_acc": {**_pct(98.57, 0.12), "where": "Sec. 4, MNIST CNN, global head on test"},
        "ttt.ttt_acc": {**_pct(99.01, 0.10), "where": "Sec. 4, MNIST CNN, TTT on the test point"},
        "ttt.gain": {**_pct(0.44), "where": "Sec. 4, MNIST: 99.01 - 98.57"},
        "ttt.locality.own_neighbourhood_acc": {**_pct(100.0), "where": "Sec. 4 locality table, MNIST"},
        "ttt.locality.whole_test_acc": {**_pct(36.38), "where": "Sec. 4 locality table, MNIST"},
    },
    "imagenet-clip": {
        "sae.dead_fraction": {"value": 0.04, "se": None, "where": "Sec. 3, about 4% dead latents"},
        "downstream.acc_raw": {**_pct(78.33, 0.19), "where": "Sec. 4, CLIP linear head, global"},
        "downstream.acc_recon": {**_pct(71.26), "where": "Sec. 3, global head on reconstructions"},
        "downstream.acc_codes": {**_pct(71.45), "where": "Sec. 3, global head on codes"},
        "sharing.union_concepts_mean": {"value": 180.0, "se": None, "where": "Sec. 3 O2, 50 neighbours, k = 16"},
        "sharing.mask_concepts_mean": {"value": 40.0, "se": None, "where": "Sec. 3 O2, learned mask, lambda 0.2"},
        "ttt.global_acc": {**_pct(78.33, 0.19), "where": "Sec. 4, CLIP linear head, global"},
        "ttt.ttt_acc": {**_pct(79.39, 0.18), "where": "Sec. 4, CLIP linear head, TTT (60 neighbours)"},
        "ttt.gain": {**_pct(1.06), "where": "Sec. 4: 79.39 - 78.33"},
        "ttt.dense_sparse_agreement": {"value": 0.89, "se": None, "where": "Sec. 3 O3"},
        "ttt.locality.own_neighbourhood_acc": {**_pct(95.19), "where": "Sec. 4 locality table, CLIP linear"},
        "ttt.locality.whole_test_acc": {**_pct(77.04), "where": "Sec. 4 locality table, CLIP linear"},
    },
}
"""The paper's numbers for the data it ran on (fractions, not percent); the TTT numbers are for TTT on the raw
embeddings (the TTT study's default space)."""

PAPER_SPACE_VALUES = {
    ("imagenet-clip", "codes"): {
        "ttt.global_acc": {**_pct(71.45), "where": "Sec. 3, global head on codes"},
        "ttt.ttt_acc": {**_pct(72.64), "where": "Sec. 3, TTT on codes, 50 neighbours"},
        "ttt.gain": {**_pct(1.19), "where": "Sec. 3: 72.64 - 71.45 on codes"},
    },
    ("imagenet-clip", "reconstructions"): {
        "ttt.global_acc": {**_pct(71.26), "where": "Sec. 3, global head on reconstructions"},
        "ttt.ttt_acc": {**_pct(72.56), "where": "Sec. 3, TTT on reconstructions, 50 neighbours"},
        "ttt.gain": {**_pct(1.30), "where": "Sec. 3: 72.56 - 71.26 on reconstructions"},
    },
}
"""The paper's TTT numbers when the TTT study runs in another space than the embeddings."""

PAPER_WIDTH = {"value": (0.001 - 0.008) / math.log2(1152 / 25), "se": None, "unit": "points per doubling",
               "where": "Sec. 4, MNIST CNNs: a gain of about 0.8 points at 25 features and 0.1 at 1152"}
"""The paper's width trend as a slope (the gain's change per doubling of the width, from its two stated ends)."""


def paper_values(preset: str, ttt_space: str | None = None) -> dict:
    """The paper's values for ``preset``'s data, with the TTT numbers of the space the TTT study ran in."""
    return {**PAPER_VALUES.get(preset, {}), **PAPER_SPACE_VALUES.get((preset, ttt_space), {})}


DIRECTIONS = [
    {"claim": "TTT beats the global head", "paired": "ttt.gain", "unpaired": ("ttt.ttt_acc", "ttt.global_acc"),
     "sign": ">", "paper": "MNIST 99.01 against 98.57 %; ImageNet (CLIP) 79.39 against 78.33 % (Sec. 4)"},
    {"claim": "TTT beats kNN majority vote", "paired": "ttt.gain_over_majority",
     "unpaired": ("ttt.ttt_acc", "ttt.majority_acc"), "sign": ">",
     "paper": "majority vote is much worse than TTT when there are many classes (Sec. 2, 4)"},
    {"claim": "neighbours share concepts", "paired": None,
     "unpaired": ("sharing.union_concepts_mean", "sharing.union_concepts_random"), "sign": "<",
     "paper": "about 180 distinct concepts over 50 neighbours, out of up to 800 (ImageNet, k = 16; Sec. 3)"},
    {"claim": "TTT heads are local specialists", "paired": "ttt.locality.specialisation",
     "unpaired": ("ttt.locality.own_neighbourhood_acc", "ttt.locality.whole_test_acc"), "sign": ">",
     "paper": "MNIST 100.00 % on its own neighbourhood against 36.38 % on the test set; ImageNet 95.19 against "
              "77.04 % (Sec. 4)"},
]
"""The qualitative claims checked on every run: a paired difference when the run has it (the same test points),
else the two metrics with their independent standard errors."""


def number_verdict(ours: dict, paper: dict, unit: str | None = None) -> str:
    """"agrees within error" or "differs by X <unit>" (``unit``: ``points`` for proportions, whose difference is
    stated in percentage points; a counted thing; None for a plain number)."""
    if ours.get("se") is None:  # one sample: its error is unknown, not zero (the paper's may be missing)
        return NO_SE
    diff = ours["value"] - paper["value"]
    se = math.hypot(verdict_se(ours) or 0.0, paper.get("se") or 0.0)
    if se > 0 and abs(diff) <= AGREE_Z * se:
        return "agrees within error"
    if se == 0 and diff == 0:
        return "agrees exactly"
    return f"differs by {format_difference(diff, unit)}" + (f" ({abs(diff) / se:.1f} SE)" if se > 0 else "")


def format_difference(diff: float, unit: str | None) -> str:
    """A difference in its unit: percentage points for proportions, else the number and what it counts."""
    if unit == "points":
        return f"{100 * diff:+.2f} points"
    return f"{diff:+.3g}" + (f" {unit}" if unit else "")


def direction_verdict(a: dict, b: dict | None, sign: str) -> str:
    """One-sided check of ``a > b`` (or ``<``); ``b`` None means zero. Unpaired SEs are combined."""
    if a.get("se") is None or (b is not None and b.get("se") is None):  # both sides are this run's measures
        return NO_SE
    diff = a["value"] - (b["value"] if b else 0.0)
    se = math.hypot(verdict_se(a) or 0.0, verdict_se(b) or 0.0 if b is not None else 0.0)
    signed = diff if sign == ">" else -diff
    if se == 0:
        return "supports the claim" if signed > 0 else "does not support it"
    if signed > AGREE_Z * se:
        return "supports the claim"
    if signed < -AGREE_Z * se:
        return "contradicts it"
    return "inconclusive (within 2 SE)"


def direction_claim(spec: dict, lookup) -> dict | None:
    """One claim of ``DIRECTIONS`` checked on a report (``lookup(path)`` -> Measure or None): paired when the run
    has the paired difference, else unpaired; None when the run has neither."""
    paired = lookup(spec["paired"]) if spec["paired"] else None
    if isinstance(paired, dict) and "value" in paired:
        verdict = direction_verdict(paired, None, spec["sign"])
        return {"claim": spec["claim"], "metric": spec["paired"], "against": "0", "measured": paired,
                "test": f"paired: the difference on the same {paired.get('n')} items, one-sided, 2 SE",
                "verdict": verdict, "paper": spec["paper"]}
    a, b = (lookup(m) for m in spec["unpaired"])
    if not (isinstance(a, dict) and "value" in a and isinstance(b, dict) and "value" in b):
        return None
    return {"claim": spec["claim"], "metric": spec["unpaired"][0], "against": spec["unpaired"][1],
            "test": "unpaired: independent standard errors combined, one-sided, 2 SE",
            "verdict": direction_verdict(a, b, spec["sign"]), "paper": spec["paper"]}


def width_slope(rows: list[dict]) -> dict | None:
    """The TTT gain's change per doubling of the backbone width, fitted over every width by least squares weighted
    by each gain's inverse variance, with the slope's standard error (None with fewer than two widths)."""
    rows = [r for r in rows if isinstance(r.get("gain"), dict) and r["gain"].get("value") is not None]
    if len(rows) < 2:
        return None
    x = [math.log2(r["n_features"]) for r in rows]
    y = [r["gain"]["value"] for r in rows]
    ses = [r["gain"].get("se") for r in rows]
    if any(s is None or s <= 0 for s in ses) or len(set(x)) < 2:
        return {"value": None, "se": None, "n": len(rows), "unit": "points per doubling",
                "provenance": "no standard error at some width: the slope can't be weighed"}
    w = [1 / s ** 2 for s in ses]
    xm = sum(wi * xi for wi, xi in zip(w, x)) / sum(w)
    ym = sum(wi * yi for wi, yi in zip(w, y)) / sum(w)
    sxx = sum(wi * (xi - xm) ** 2 for wi, xi in zip(w, x))
    slope = sum(wi * (xi - xm) * (yi - ym) for wi, xi, yi in zip(w, x, y)) / sxx
    return {"value": slope, "se": math.sqrt(1 / sxx), "n": len(rows), "kind": "difference",
            "unit": "points per doubling", "provenance": f"weighted least squares of the paired gain on log2 of "
                                                         f"the width, {len(rows)} widths"}


def width_verdict(rows: list[dict]) -> dict | None:
    """Whether the TTT gain shrinks as the model grows: the slope of the gain over all widths (``width_slope``)
    is below zero by more than two standard errors."""
    slope = width_slope(rows)
    if slope is None:
        return None
    rows = sorted(rows, key=lambda r: r["n_features"])  # --widths may list them in any order
    per_width = ", ".join(f"{100 * r['gain']['value']:+.2f} ± {100 * (r['gain'].get('se') or 0):.2f} points at "
                          f"{r['n_features']} features" for r in rows)
    verdict = (f"inconclusive (not measured: {slope['provenance']})" if slope["value"] is None
               else direction_verdict(slope, None, "<"))
    text = ("—" if slope["value"] is None else
            f"slope {100 * slope['value']:+.2f} ± {100 * slope['se']:.2f} points per doubling of the width")
    return {"claim": "the TTT gain shrinks as the model grows", "metric": "sweeps.width", "measured": slope,
            "against": f"{text} (gain {per_width})", "test": "the slope over every width, one-sided, 2 SE",
            "paper": f"{PAPER_WIDTH['where']}: about {100 * PAPER_WIDTH['value']:+.2f} points per doubling",
            "paper_value": PAPER_WIDTH, "verdict": verdict}
