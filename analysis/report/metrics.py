"""The report's words for its numbers: what each headline metric is called, what the paper's claim about it
means, what it counts and in which unit a difference of it is stated.

A metric is named by its dotted path in ``report.json`` (``ttt.locality.whole_test_acc``); the page shows the
words, and the path in small type for whoever looks it up in the JSON.
"""

from __future__ import annotations

from analysis.stats import as_proportion

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
}
"""One sentence per reported number: what the paper's claim about it means."""

LABELS = {
    "sae.fvu": "SAE: variance left unexplained (FVU)",
    "sae.dead_fraction": "SAE: concepts that never fire",
    "downstream.acc_raw": "Linear probe on the embeddings",
    "downstream.acc_recon": "Linear probe on the SAE reconstructions",
    "downstream.acc_codes": "Linear probe on the SAE codes",
    "sharing.union_concepts_mean": "Distinct concepts in a neighbourhood",
    "sharing.union_concepts_random": "Distinct concepts in a random set",
    "sharing.union_concepts_same_label": "Distinct concepts in a random same-label set",
    "sharing.mask_concepts_mean": "Concepts a learned mask keeps",
    "sharing.o1_distance": "O1: distance of the concept-cosine distributions",
    "ttt.global_acc": "Global head",
    "ttt.ttt_acc": "TTT",
    "ttt.majority_acc": "kNN majority vote",
    "ttt.gain": "TTT − global head (paired)",
    "ttt.gain_over_majority": "TTT − kNN majority vote (paired)",
    "ttt.dense_sparse_agreement": "O3: dense and masked sparse TTT agree",
    "ttt.locality.own_neighbourhood_acc": "TTT head on its own neighbourhood",
    "ttt.locality.whole_test_acc": "TTT head on the whole test set",
    "ttt.locality.specialisation": "Own neighbourhood − whole test set (paired)",
}
"""Short names in words, for table rows and legends."""

ITEMS = {
    "sae.fvu": "test images", "sae.dead_fraction": "latents", "downstream": "test images",
    "sharing.mask_concepts_mean": "test queries", "sharing": "neighbourhoods", "ttt.locality": "TTT heads",
    "ttt.dense_sparse_agreement": "test queries", "ttt": "test points",
}
"""What the n of a metric counts (the longest matching prefix wins)."""

PROPORTIONS = ("sae.dead_fraction", "downstream.acc_raw", "downstream.acc_recon", "downstream.acc_codes",
               "ttt.global_acc", "ttt.ttt_acc", "ttt.majority_acc", "ttt.dense_sparse_agreement",
               "ttt.locality.own_neighbourhood_acc", "ttt.locality.whole_test_acc")
"""Headline metrics that are proportions (an interval, and differences in points)."""
DIFFERENCES = ("ttt.gain", "ttt.gain_over_majority", "ttt.locality.specialisation")
"""Headline metrics that are paired differences of proportions (in points)."""
COUNTS = {"sharing.union_concepts_mean": "concepts", "sharing.union_concepts_random": "concepts",
          "sharing.union_concepts_same_label": "concepts", "sharing.mask_concepts_mean": "concepts"}
"""Headline metrics that count something, and what."""


def label(metric: str) -> str:
    """The words for ``metric`` (its path when it has none)."""
    return LABELS.get(metric, metric)


def items(metric: str) -> str:
    """What the n of ``metric`` counts."""
    best = max((p for p in ITEMS if metric == p or metric.startswith(p + ".")), key=len, default=None)
    return ITEMS[best] if best else "items"


def unit(metric: str) -> str | None:
    """The unit a difference of ``metric`` is stated in: ``points`` (percentage points) for proportions and their
    differences, the counted thing for counts, None for a plain number."""
    if metric in PROPORTIONS or metric in DIFFERENCES:
        return "points"
    return COUNTS.get(metric)


def typed(metric: str, m: dict) -> dict:
    """``m`` with the kind its metric has: a proportion gets its Wilson interval, a paired difference of
    proportions its unit (Measures written before these existed get them here, so that the page, report.json and
    the terminal show every kind one way)."""
    if not isinstance(m, dict) or m.get("value") is None:
        return m
    leaf = metric.rsplit(".", 1)[-1]
    if metric in PROPORTIONS or leaf.endswith("_acc") or leaf in ("acc", "rate", "agreement"):
        return as_proportion(m)
    if (metric in DIFFERENCES or leaf.startswith("gain")) and "kind" not in m and abs(m["value"]) <= 1.0:
        return {**m, "kind": "difference", "unit": "points"}
    return m
