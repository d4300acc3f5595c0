"""Reported numbers: a value with its uncertainty and the number of items behind it.

Every statistic the toolkit reports is a ``Measure`` dict ``{"value", "se", "n"}`` (plus optional
``"provenance"``), so that JSON, plots and the report never show a number without its uncertainty. Two kinds
carry more:

- a **proportion** (an accuracy, a share of latents, an agreement rate): ``"kind": "proportion"`` and
  ``"interval": [low, high]``, its 95% Wilson score interval. The binomial SE ``sqrt(p(1-p)/n)`` collapses to 0
  at p = 0 or 1 ("100 ± 0 %" reads as certainty after 50 trials); the Wilson interval does not (Wilson 1927,
  "Probable inference, the law of succession, and statistical inference", JASA 22);
- a **paired difference** of two proportions on the same items (TTT correct minus global correct):
  ``"kind": "difference", "unit": "points"``, its SE the paired one over the items.

``format_measure`` writes any Measure the one way the report and the terminal show it.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054
"""The two-sided 95% normal quantile of the Wilson intervals."""
PROPORTION = "proportion"
DIFFERENCE = "difference"


def measure(samples, provenance: str | None = None) -> dict:
    """Mean of ``samples`` with its standard error over them (sample std / sqrt(n), ddof=1)."""
    a = np.asarray(samples, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError("cannot summarise an empty set of samples")
    if not np.isfinite(a).all():
        raise ValueError("samples contain NaN or Inf")
    se = float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else float("nan")
    out = {"value": float(a.mean()), "se": se if math.isfinite(se) else None, "n": int(a.size)}
    if provenance is not None:
        out["provenance"] = provenance
    return out


def wilson_interval(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``successes`` out of ``n`` (never empty, never past [0, 1])."""
    if n <= 0:
        raise ValueError("a proportion needs at least one trial")
    p = min(max(successes / n, 0.0), 1.0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if p == 0.0 else max(0.0, centre - half)  # exact ends, not a rounding error away from them
    high = 1.0 if p == 1.0 else min(1.0, centre + half)
    return low, high


def proportion(successes: float, n: int, provenance: str | None = None) -> dict:
    """A proportion Measure: ``successes / n``, its binomial SE and its 95% Wilson interval."""
    if n <= 0:
        raise ValueError("cannot compute a proportion over zero items")
    p = float(successes) / n
    out = {"value": p, "se": math.sqrt(max(p * (1 - p), 0.0) / n), "n": int(n), "kind": PROPORTION,
           "interval": list(wilson_interval(successes, n))}
    if provenance is not None:
        out["provenance"] = provenance
    return out


def accuracy(correct, provenance: str | None = None) -> dict:
    """Accuracy of a boolean vector: a proportion Measure (binomial SE and Wilson interval)."""
    c = np.asarray(correct, dtype=bool).ravel()
    if c.size == 0:
        raise ValueError("cannot compute an accuracy over zero points")
    return proportion(int(c.sum()), int(c.size), provenance)


def mean_of_proportions(fractions, provenance: str | None = None, n_trials: int | None = None) -> dict:
    """The mean of per-item proportions (e.g. each TTT head's accuracy on its own neighbourhood, ``n_trials``
    points each), with the SE over the items and a Wilson interval on the effective number of trials that matches
    that SE (``p(1-p)/se²``, between the number of items and of all trials); all items at 0 or 1 count every
    trial (each item once when ``n_trials`` is not given)."""
    out = measure(fractions, provenance)
    a = np.asarray(fractions, dtype=np.float64)
    if a.min() < 0 or a.max() > 1:
        raise ValueError("proportions must lie in [0, 1]")
    n, p, se = out["n"], out["value"], out["se"] or 0.0
    most = n * max(int(n_trials or 1), 1)
    n_eff = most if se == 0 else min(max(p * (1 - p) / se ** 2, n), most)
    out["kind"] = PROPORTION
    out["interval"] = list(wilson_interval(p * n_eff, n_eff))
    return out


def paired_difference(a, b, provenance: str | None = None, proportions: bool | None = None) -> dict:
    """Mean of ``a - b`` over the same items (e.g. TTT correct minus global correct), with its paired SE. A
    difference of proportions (``proportions``; by default: both samples are 0/1 outcomes) is in points."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.size != b.size:
        raise ValueError(f"paired samples differ in length: {a.size} and {b.size}")
    out = measure(a.astype(np.float64).ravel() - b.astype(np.float64).ravel(), provenance)
    if proportions or (proportions is None and _is_binary(a) and _is_binary(b)):
        out["kind"], out["unit"] = DIFFERENCE, "points"
    return out


def _is_binary(a: np.ndarray) -> bool:
    return a.dtype == bool or bool(np.isin(a, (0, 1)).all())


def combined_se(*measures: dict | None) -> float:
    """Standard error of a sum or difference of independent measures: the root of their summed squared SEs (a
    missing measure or SE counts as zero)."""
    return math.sqrt(sum(((m or {}).get("se") or 0.0) ** 2 for m in measures))


def as_proportion(m: dict) -> dict:
    """``m`` marked as a proportion, with its Wilson interval when it has none (a Measure written before the
    intervals existed, or a mean of 0/1 outcomes); ``m`` itself when its value is not in [0, 1]."""
    if m.get("value") is None or not 0.0 <= m["value"] <= 1.0 or not m.get("n"):
        return m
    if m.get("kind") == PROPORTION and m.get("interval"):
        return m
    return {**m, "kind": PROPORTION, "interval": list(wilson_interval(m["value"] * m["n"], int(m["n"])))}


def verdict_se(m: dict | None) -> float | None:
    """The standard error a verdict uses: a proportion's never falls below its Wilson half-width / 1.96 (at 0 or 1
    the binomial SE is 0, which would make any difference infinitely significant)."""
    if m is None or m.get("se") is None:
        return None if m is not None else 0.0
    if m.get("kind") == PROPORTION and m.get("interval"):
        low, high = m["interval"]
        return max(float(m["se"]), (high - low) / (2 * Z95))
    return float(m["se"])


def format_measure(m: dict | None, with_n: bool = True) -> str:
    """A Measure as text, one format per kind: ``95.82 % (95% CI 93.27–97.36)`` for a proportion, ``+1.11 ± 0.79
    points`` for a paired difference of proportions, ``33.13 ± 0.53`` otherwise (± one standard error), then
    ``(n = 359)`` when ``with_n``. A measurement that could not be made says why."""
    if not m:
        return "—"
    if m.get("value") is None:
        return f"— ({m.get('provenance') or 'not measured'})"
    v, se = float(m["value"]), m.get("se")
    n = f"n = {m['n']}" if with_n and m.get("n") is not None else ""
    if m.get("kind") == PROPORTION and m.get("interval"):
        low, high = m["interval"]
        return f"{100 * v:.2f} % (95% CI {100 * low:.2f}–{100 * high:.2f}" + (f", {n})" if n else ")")
    if m.get("kind") == DIFFERENCE:
        text = (f"{100 * v:+.2f}" + (f" ± {100 * se:.2f}" if se is not None else " (no SE)")
                + f" {m.get('unit') or 'points'}")
    else:
        text = f"{v:.4g}" + (f" ± {se:.2g}" if se is not None else " (no SE)")
    return text + (f" ({n})" if n else "")
