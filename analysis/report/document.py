"""``report.json``: every number of a run with its standard error, n and provenance, the paper's values and the
verdicts, the plots, the sections that could not be computed and why, provenance and timings.

Schema (``"schema": "ttt-concepts-report/1"``)::

    preset, created, settings                      the preset and every setting of the run
    sae / downstream / sharing / ttt / theory      Measures: {"value", "se", "n", "provenance", "stage", "stage_key"}
                                                   (nested: ttt.locality.own_neighbourhood_acc ...)
    sweeps.n_neighbours, sweeps.width              lists of rows, each with Measures
    comparisons                                    [{"metric", "claim", "ours", "paper", "verdict"}] (paper: null
                                                   when the preset has no paper value; verdict then about direction)
    claims                                         [{"claim", "metric", "against", "verdict"}] qualitative claims
    sections                                       {name: {"status": "ok"|"missing"|"failed", "reason"}}
    plots                                          {name: path relative to the run directory}
    gallery, cards                                 concept gallery and image cards (see analysis.report.gallery)
    provenance                                     versions, artifacts {stage: {"dir", "key", "hashes"}}
    timings                                        {stage: {"seconds", "cpu_seconds", "reused"}}, "total_s"

A section whose stage is missing or failed has no numbers at all: never a placeholder.
"""

from __future__ import annotations

import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

from analysis.run.cache import StageResult
from analysis.report.paper import CLAIMS, DIRECTIONS, direction_verdict, number_verdict, paper_values, width_verdict
from artifacts import package_version

SCHEMA = "ttt-concepts-report/1"
METRIC_GROUPS = ("sae", "downstream", "sharing", "ttt", "theory")


def is_measure(obj) -> bool:
    """A Measure dict: a value with its standard error and n."""
    return isinstance(obj, dict) and "value" in obj and "n" in obj


def _tag(tree, stage: StageResult):
    """``tree`` with every Measure tagged with the stage and key that made it."""
    if is_measure(tree):
        return {**tree, "stage": stage.name, "stage_key": stage.key[:12]}
    if isinstance(tree, dict):
        return {k: _tag(v, stage) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_tag(v, stage) for v in tree]
    return tree


def _merge(into: dict, tree: dict) -> None:
    for key, value in tree.items():
        if isinstance(value, dict) and not is_measure(value) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def lookup(report: dict, path: str):
    """The value at a dotted path (``ttt.locality.whole_test_acc``), or None."""
    node = report
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _plots(stage: StageResult, run_dir: Path) -> dict:
    out = {}
    for name, path in (stage.result.get("plots") or {}).items():
        p = Path(path)
        p = p if p.is_absolute() else stage.dir / p
        try:
            out[f"{stage.name}.{name}"] = p.resolve().relative_to(run_dir.resolve()).as_posix()
        except ValueError:
            out[f"{stage.name}.{name}"] = str(p)
    return out


def build_report(preset: str, settings: dict, results: dict[str, StageResult], sections: dict[str, dict],
                 run_dir: Path, extra_plots: dict | None = None, versions: dict | None = None) -> dict:
    """Assemble ``report.json`` from the finished stages (see the module docstring)."""
    report = {"schema": SCHEMA, "preset": preset, "settings": settings,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "sweeps": {}, "plots": {}, "sections": sections}
    for stage in results.values():
        metrics = stage.result.get("metrics") or {}
        _merge(report, _tag({k: v for k, v in metrics.items() if k in METRIC_GROUPS and isinstance(v, dict)}, stage))
        for name, rows in (metrics.get("sweeps") or {}).items():
            report["sweeps"][name] = _tag(rows, stage)
        for key in ("gallery", "cards"):
            if metrics.get(key):
                report[key] = metrics[key]
        report["plots"].update(_plots(stage, run_dir))
    report["plots"].update(extra_plots or {})
    ttt_space = results["ttt"].settings.get("space") if "ttt" in results else None
    report["comparisons"] = comparisons(report, preset, ttt_space)
    report["claims"] = claims(report)
    report["provenance"] = provenance(results, versions)
    report["timings"] = {name: {"seconds": r.seconds, "cpu_seconds": r.cpu_seconds, "reused": r.reused}
                         for name, r in results.items()}
    report["timings"]["total_s"] = sum(r.seconds for r in results.values())
    return report


def comparisons(report: dict, preset: str, ttt_space: str | None = None) -> list[dict]:
    """One row per reported headline number: ours, the paper's (where the preset mirrors it), the verdict."""
    paper = paper_values(preset, ttt_space)
    rows = []
    for metric, claim in CLAIMS.items():
        ours = lookup(report, metric)
        if not is_measure(ours):
            continue
        theirs = paper.get(metric)
        rows.append({"metric": metric, "claim": claim, "ours": ours, "paper": theirs,
                     "verdict": number_verdict(ours, theirs) if theirs else "not compared"})
    for c in (report.get("theory") or {}).get("claims") or []:  # the theory study judges its own claims
        if is_measure(c.get("measured")):
            measured = c["measured"]
            verdict = ("supports the claim" if c.get("holds") else "does not support it") \
                if measured["value"] is not None else f"inconclusive (not measured: {measured.get('provenance')})"
            rows.append({"metric": "theory.claims", "claim": c["claim"], "ours": measured, "paper": None,
                         "paper_text": c.get("paper"), "verdict": verdict, "detail": c.get("detail")})
    return rows


def claims(report: dict) -> list[dict]:
    """The paper's qualitative claims that this run's numbers can check."""
    out = []
    for metric, other, sign, claim in DIRECTIONS:
        a, b = lookup(report, metric), (lookup(report, other) if other else None)
        if not is_measure(a) or (other and not is_measure(b)):
            continue
        out.append({"claim": claim, "metric": metric, "against": other or "0", "verdict": direction_verdict(a, b, sign)})
    width = width_verdict(report["sweeps"].get("width") or [])
    if width:
        out.append({"claim": width["claim"], "metric": "sweeps.width", "against": width["measured"],
                    "verdict": width["verdict"], "paper": width["paper"]})
    return out


def provenance(results: dict[str, StageResult], versions: dict | None = None) -> dict:
    """Versions of the software, and every stage's directory, key and settings."""
    import numpy
    import torch

    return {
        "package_version": package_version(), "python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "numpy": numpy.__version__, **(versions or {}),
        "artifacts": {name: {"dir": str(r.dir), "key": r.key, "settings": r.settings,
                             "hashes": {k: v for k, v in r.result.items() if "hash" in k}}
                      for name, r in results.items()},
    }
