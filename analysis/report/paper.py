"""The paper's values (see PAPER.md for where each comes from) and the verdicts that compare a run with them.

Two kinds of comparison:

- against a number: where a preset mirrors the paper's setting (``mnist``: Section 4's MNIST CNN;
  ``imagenet-clip``: Sections 3 and 4 on CLIP ViT-B/16), our Measure and the paper's value give
  "agrees within error" when they differ by at most two combined standard errors (the paper's SE where it gives
  one, else ours alone), else "differs by X";
- against a direction: every preset, the digits included, checks the paper's qualitative claims (TTT beats the
  global head, neighbourhoods share concepts, ...) with a one-sided two-SE test: "supports the claim",
  "does not support it" or "inconclusive".
"""

from __future__ import annotations

from analysis.stats import combined_se

AGREE_Z = 2.0
"""Differences within this many combined standard errors count as agreement."""
NO_SE = "inconclusive (no standard error: a single sample)"
"""The verdict on a measure of one item (``analysis.stats.measure`` gives it ``se`` None: unknown, not zero)."""

CLAIMS = {
    "sae.fvu": "Share of the embeddings' variance that the SAE's k active concepts leave unexplained.",
    "sae.dead_fraction": "Share of concepts (SAE latents) that never fire; the paper's SAE has about 4% dead.",
    "downstream.acc_raw": "A linear probe on the raw embeddings: the reference accuracy.",
    "downstream.acc_recon": "A linear probe on SAE reconstructions keeps most of the raw accuracy (O1 holds downstream).",
    "downstream.acc_codes": "A linear probe on the sparse codes keeps most of the raw accuracy.",
    "sharing.union_concepts_mean": "A test point's nearest neighbours (50 in the paper) use few distinct concepts "
                                   "(local sparsity, O2).",
    "sharing.union_concepts_random": "Random sets of the same size use many more concepts (the baseline).",
    "sharing.union_concepts_same_label": "Random same-label sets: how much of the sharing is semantic.",
    "sharing.mask_concepts_mean": "A learned mask keeps only a few concepts per neighbourhood with no accuracy loss "
                                  "(O2).",
    "sharing.o1_distance": "Neighbours found in embeddings, reconstructions or codes look alike in concept space (O1).",
    "ttt.global_acc": "The globally trained head on the test set.",
    "ttt.ttt_acc": "Local TTT on each test point's neighbours beats the global head.",
    "ttt.majority_acc": "kNN majority vote in the same space is worse than TTT.",
    "ttt.gain": "TTT minus global accuracy on the same test points (paired).",
    "ttt.dense_sparse_agreement": "Dense TTT and masked sparse TTT predict the same class (implicit concept "
                                  "selection, O3).",
    "ttt.locality.own_neighbourhood_acc": "A TTT head is a specialist: near-perfect on its own neighbourhood ...",
    "ttt.locality.whole_test_acc": "... and poor on the whole test set.",
    "sweeps.width": "The TTT gain shrinks as the backbone grows (less underparameterised).",
}
"""One sentence per reported number: what the paper's claim about it means."""


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
"""The paper's numbers for the presets that mirror its settings (fractions, not percent); the TTT numbers are for
TTT on the raw embeddings (the TTT study's default space)."""

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


def paper_values(preset: str, ttt_space: str | None = None) -> dict:
    """The paper's values for ``preset``, with the TTT numbers of the space the TTT study ran in."""
    return {**PAPER_VALUES.get(preset, {}), **PAPER_SPACE_VALUES.get((preset, ttt_space), {})}

DIRECTIONS = [
    ("ttt.gain", None, ">", "TTT beats the global head"),
    ("ttt.ttt_acc", "ttt.majority_acc", ">", "TTT beats kNN majority vote"),
    ("sharing.union_concepts_mean", "sharing.union_concepts_random", "<", "neighbours share concepts"),
    ("ttt.locality.own_neighbourhood_acc", "ttt.locality.whole_test_acc", ">", "TTT heads are local specialists"),
]
"""Qualitative claims checked on every preset: (metric, other metric or None for zero, direction, claim)."""


def number_verdict(ours: dict, paper: dict) -> str:
    """"agrees within error" or "differs by X" (in the metric's units; percent points for accuracies)."""
    if ours.get("se") is None:  # one sample: its error is unknown, not zero (the paper's may be missing)
        return NO_SE
    diff = ours["value"] - paper["value"]
    se = combined_se(ours, paper)
    if se > 0 and abs(diff) <= AGREE_Z * se:
        return "agrees within error"
    if se == 0 and diff == 0:
        return "agrees exactly"
    return f"differs by {format_difference(diff, ours['value'])}" + (f" ({abs(diff) / se:.1f} SE)" if se > 0 else "")


def format_difference(diff: float, reference: float) -> str:
    """A difference in points for fractions (|value| <= 1), else as a plain number."""
    if abs(reference) <= 1.0:
        return f"{100 * diff:+.2f} points"
    return f"{diff:+.3g}"


def direction_verdict(a: dict, b: dict | None, sign: str) -> str:
    """One-sided check of ``a > b`` (or ``<``); ``b`` None means zero. Unpaired SEs are combined."""
    if a.get("se") is None or (b is not None and b.get("se") is None):  # both sides are this run's measures
        return NO_SE
    diff = a["value"] - (b["value"] if b else 0.0)
    se = combined_se(a, b)
    signed = diff if sign == ">" else -diff
    if se == 0:
        return "supports the claim" if signed > 0 else "does not support it"
    if signed > AGREE_Z * se:
        return "supports the claim"
    if signed < -AGREE_Z * se:
        return "contradicts it"
    return "inconclusive (within 2 SE)"


def width_verdict(rows: list[dict]) -> dict | None:
    """Whether the TTT gain at the narrowest width exceeds the gain at the widest (a paired-free difference)."""
    if len(rows) < 2:
        return None
    rows = sorted(rows, key=lambda r: r["n_features"])  # --widths may list them in any order
    first, last = rows[0]["gain"], rows[-1]["gain"]
    return {
        "claim": "the TTT gain shrinks as the model grows",
        "measured": f"gain {100 * first['value']:+.2f} ± {100 * (first['se'] or 0):.2f} points at "
                    f"{rows[0]['n_features']} features, {100 * last['value']:+.2f} ± {100 * (last['se'] or 0):.2f} "
                    f"at {rows[-1]['n_features']}",
        "paper": "MNIST: about 0.8 points at the smallest CNN, about 0.1 at the largest (Sec. 4)",
        "verdict": direction_verdict(first, last, ">"),
    }
