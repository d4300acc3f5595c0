"""Reported numbers: a value with its standard error and the number of items behind it.

Every statistic the toolkit reports is a ``Measure`` dict ``{"value", "se", "n"}`` (plus optional
``"provenance"``), so that JSON, plots and the report never show a number without its uncertainty.
"""

from __future__ import annotations

import math

import numpy as np


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


def accuracy(correct, provenance: str | None = None) -> dict:
    """Accuracy of a boolean vector with its binomial standard error sqrt(p(1-p)/n)."""
    c = np.asarray(correct, dtype=bool).ravel()
    if c.size == 0:
        raise ValueError("cannot compute an accuracy over zero points")
    p = float(c.mean())
    out = {"value": p, "se": math.sqrt(p * (1 - p) / c.size), "n": int(c.size)}
    if provenance is not None:
        out["provenance"] = provenance
    return out


def paired_difference(a, b, provenance: str | None = None) -> dict:
    """Mean of ``a - b`` over the same items (e.g. TTT correct minus global correct), with its paired SE."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.size} and {b.size}")
    return measure(a - b, provenance)


def combined_se(*measures: dict | None) -> float:
    """Standard error of a sum or difference of independent measures: the root of their summed squared SEs (a
    missing measure or SE counts as zero)."""
    return math.sqrt(sum(((m or {}).get("se") or 0.0) ** 2 for m in measures))
