"""Sweeps of the theory experiment: errors of the global head, local TTT and the kNN baseline as one setting of
the model varies, pooled over seeds and test points into Measure dicts (value, standard error, n).

A row of a sweep holds, for one setting: ``global``, ``ttt``, ``knn`` (mean per-point error), ``gain``
(global − TTT, paired over the same points), ``population`` (the exact best-linear error of each draw, over
seeds), ``union`` (distinct true concepts in a TTT neighbourhood: the local sparsity the theory needs) and
``same_cluster`` (fraction of neighbours from the query's own cluster).
"""

from __future__ import annotations

import math

import numpy as np

from analysis.stats import measure, paired_difference
from analysis.theory.model import ConceptModelConfig, global_error_claim, global_error_sd
from analysis.theory.predict import DrawResult, PredictorConfig, evaluate_draw


def summarise(draws: list[DrawResult], k: int) -> dict:
    """One sweep row from the draws of one setting (all seeds), for neighbourhood size ``k``."""
    glob = np.concatenate([d.global_error for d in draws])
    parts = {name: np.concatenate([d.by_k[k][name] for d in draws]) for name in ("ttt", "knn", "union",
                                                                                   "same_cluster")}
    row = {
        "global": measure(glob, "global head, mean per-point error over seeds × test points"),
        "ttt": measure(parts["ttt"], "local TTT from the global head"),
        "knn": measure(parts["knn"], "kNN baseline in the same neighbourhoods"),
        "gain": paired_difference(glob, parts["ttt"], "global − TTT error, paired per test point"),
        "union": measure(parts["union"], "distinct true concepts over a neighbourhood"),
        "same_cluster": measure(parts["same_cluster"], "neighbours from the query's own cluster"),
        "n_neighbours": k,
        "n_seeds": len(draws),
    }
    if all("ttt_converged" in d.by_k[k] for d in draws):
        row["ttt_converged"] = measure(np.concatenate([d.by_k[k]["ttt_converged"] for d in draws]),
                                       "local ERM run to convergence")
    populations = [d.population_error for d in draws]
    if all(math.isfinite(p) for p in populations):
        row["population"] = measure(populations, "exact best-linear error of each draw (closed form)")
    return row


def run_seeds(config: ConceptModelConfig, predictor: PredictorConfig, seeds: list[int],
              n_neighbours: list[int] | None = None, converged: bool = False) -> list[DrawResult]:
    """One draw per seed of the same setting."""
    return [evaluate_draw(config.replace(seed=seed), predictor, n_neighbours, converged) for seed in seeds]


def sweep(base: ConceptModelConfig, predictor: PredictorConfig, name: str, values: list, seeds: list[int],
          extra_k: dict | None = None, converged: bool = False) -> tuple[list[dict], dict]:
    """Rows over ``name`` ∈ ``values`` at the predictor's neighbourhood size; ``extra_k`` maps a value to more
    neighbourhood sizes to evaluate on the same draws (with the converged ERM too), ``converged`` adds it
    everywhere. Returns the rows and the draws of every value."""
    rows, kept = [], {}
    k = predictor.ttt.n_neighbours
    extra_k = extra_k or {}
    for value in values:
        sizes = sorted({k, *extra_k.get(value, [])})
        draws = run_seeds(base.replace(**{name: value}), predictor, seeds, sizes, converged or value in extra_k)
        rows.append({name: value, **summarise(draws, k)})
        kept[value] = draws
    return rows, kept


def d2_rows(rows: list[dict], d1: int, n_train: int, noise: float) -> list[dict]:
    """The d2 sweep's rows with the paper's global-error claim and its tolerance beside each measurement."""
    out = []
    for row in rows:
        d2 = row["d2"]
        tol = global_error_tolerance(d1, d2, n_train, noise, row["global"]["se"] or 0.0, row["n_seeds"])
        out.append({**row, "claim_global": global_error_claim(d1, d2), "claim_tolerance": tol,
                    "claim_holds": abs(row["global"]["value"] - global_error_claim(d1, d2)) <= tol})
    return out


def global_error_tolerance(d1: int, d2: int, n_train: int, noise: float, se: float, n_seeds: int,
                           z: float = 4.0) -> float:
    """How far a measured global error may lie from ``1 − d2/d1`` and still agree with it.

    Three sources: the test points (``se``), the draw of ``w*`` relative to ``A`` (Beta spread over
    ``n_seeds`` draws, ``global_error_sd``), each allowed ``z`` standard errors, plus the fitted head's finite-
    sample excess, the least-squares variance term ``(1 − d2/d1 + σ²)·(d2 + 1)/(n − d2 − 2)`` (Gaussian design).
    """
    spread = math.sqrt(se ** 2 + global_error_sd(d1, d2) ** 2 / max(n_seeds, 1))
    residual = global_error_claim(d1, d2) + noise ** 2
    overfit = residual * (d2 + 1) / max(n_train - d2 - 2, 1)
    return z * spread + overfit


def k_rows(draws: list[DrawResult], sizes: list[int], noise: float, s: int, d1: int) -> list[dict]:
    """TTT error against neighbourhood size, beside the paper's rate scale ``σ² s log(d1/s) / n_neighbours``."""
    rows = []
    for k in sorted(sizes):
        row = summarise(draws, k)
        scale = noise ** 2 * s * math.log(d1 / s) / k if s < d1 else float("nan")
        best = row.get("ttt_converged", row["ttt"])
        rows.append({**row, "rate_scale": scale,
                     "ttt_over_scale": best["value"] / scale if scale > 0 else None})
    return rows


def log_slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log y against log x over ``(x, y)`` points with y > 0 (None below two points)."""
    pts = [(math.log(x), math.log(y)) for x, y in points if y > 0]
    if len(pts) < 2:
        return None
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def slope_over_seeds(curves: list[list[tuple[float, float]]], provenance: str) -> dict | None:
    """The log-log slope of each seed's curve, as a Measure over seeds (None if no curve has two points)."""
    slopes = [s for s in (log_slope(c) for c in curves) if s is not None]
    return measure(slopes, provenance) if slopes else None


def rate_slopes(k_draws: list[DrawResult], noise_draws: dict, k: int, lo: float, hi: float) -> dict:
    """The theory's rate read off the converged local ERM, per seed: the slope of its error against
    n_neighbours in ``(lo, hi]`` (claim: −1) and against σ² at ``k`` neighbours (claim: +1)."""
    by_k = [[(kk, float(v["ttt_converged"].mean())) for kk, v in sorted(d.by_k.items())
             if lo < kk <= hi and "ttt_converged" in v] for d in k_draws]
    n_seeds = min(len(draws) for draws in noise_draws.values())
    by_noise = [[(noise ** 2, float(draws[i].by_k[k]["ttt_converged"].mean()))
                 for noise, draws in sorted(noise_draws.items())] for i in range(n_seeds)]
    return {
        "k_slope": slope_over_seeds(by_k, "log-log slope of converged ERM error vs n_neighbours in "
                                          f"({lo:.0f}, {hi:.0f}]"),
        "noise_slope": slope_over_seeds(by_noise, f"log-log slope of converged ERM error vs σ² at {k} neighbours"),
        "k_range": [lo, hi],
    }
