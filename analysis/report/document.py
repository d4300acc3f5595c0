"""``report.json``: every number of a run with its uncertainty, n and provenance, the paper's values and the
verdicts, the setup, the plots, the sections that could not be computed and why, provenance and timings.

Schema (``"schema": "ttt-concepts-report/2"``)::

    preset, created                                the preset and when the report was made
    settings                                       every setting of the run, each resolved (a default is shown as
                                                   the value the run used, never null)
    data                                           {"name", "classes", "paper_data", "evidence"}: what the data
                                                   is, recognised by content, and whether the paper ran on it
    setup                                          [{"title", "rows": [[label, value]]}]: the setup card
    sae / downstream / sharing / ttt / theory      Measures: {"value", "se", "n", "provenance", "stage",
                                                   "stage_key"}; a proportion adds "kind": "proportion" and
                                                   "interval" (95% Wilson), a paired difference of proportions
                                                   "kind": "difference", "unit": "points"
    sweeps.n_neighbours, sweeps.train_size, sweeps.width    lists of rows, each with Measures
    comparisons                                    [{"metric", "label", "claim", "items", "ours", "paper",
                                                   "verdict"}]: paper null unless the run's data is the paper's
    claims                                         [{"claim", "metric", "against", "test", "verdict", "paper"}]:
                                                   the qualitative claims, paired where the run has the pairs
    sections                                       {name: {"status": "ok"|"missing"|"failed", "reason"}}
    plots                                          {name: path relative to the run directory}; plots_refused:
                                                   {name: why} for a path outside the run directory or missing
    gallery, cards                                 concept gallery and image cards (see analysis.report.gallery)
    provenance                                     versions, artifacts {stage: {"dir", "key", "settings", "hashes"}}
    timings                                        {stage: {"seconds", "cpu_seconds", "reused"}}, "total_s"

A section whose stage is missing or failed has no numbers at all: never a placeholder.
"""

from __future__ import annotations

import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

from analysis.run.cache import StageResult
from analysis.report.datasets import NOT_PAPER, describe_data
from analysis.report.embed import embed_png, inside_run_dir
from analysis.report.metrics import CLAIMS, items, label, typed, unit
from analysis.report.paper import DIRECTIONS, direction_claim, number_verdict, paper_values, width_verdict
from analysis.report.setup import read_json_list, resolve_settings, setup_card
from artifacts import package_version

SCHEMA = "ttt-concepts-report/2"
METRIC_GROUPS = ("sae", "downstream", "sharing", "ttt", "theory")


def is_measure(obj) -> bool:
    """A Measure dict: a value with its standard error and n."""
    return isinstance(obj, dict) and "value" in obj and "n" in obj


def _tag(tree, stage: StageResult, path: str = ""):
    """``tree`` with every Measure tagged with the stage and key that made it, and typed by its metric's kind."""
    if is_measure(tree):
        return {**typed(path, tree), "stage": stage.name, "stage_key": stage.key[:12]}
    if isinstance(tree, dict):
        return {k: _tag(v, stage, f"{path}.{k}" if path else k) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_tag(v, stage, path) for v in tree]
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


def _plots(stage: StageResult, run_dir: Path) -> tuple[dict, dict]:
    """The stage's plots as paths relative to the run directory, and those refused with the reason."""
    out, refused = {}, {}
    for name, path in (stage.result.get("plots") or {}).items():
        key = f"{stage.name}.{name}"
        if not isinstance(path, str):
            continue
        p = (Path(path) if Path(path).is_absolute() else Path(stage.dir) / path).absolute()  # run_dir may be relative
        found = inside_run_dir(run_dir, p)
        if found is None:
            refused[key] = embed_png(run_dir, p)["reason"]
            continue
        out[key] = found.relative_to(Path(run_dir).resolve()).as_posix()
    return out, refused


def build_report(preset: str, settings: dict, results: dict[str, StageResult], sections: dict[str, dict],
                 run_dir: Path, extra_plots: dict | None = None, versions: dict | None = None,
                 data: dict | None = None) -> dict:
    """Assemble ``report.json`` from the finished stages (see the module docstring). ``data``: what the data is
    (``analysis.report.datasets.describe_data``), recognised from the stages when not given."""
    n_classes = len(read_json_list(Path(results["store"].dir) / "classes.json")) if "store" in results else None
    data = data or describe_data(preset, results, n_classes)
    report = {"schema": SCHEMA, "preset": preset, "settings": resolve_settings(settings, results),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "data": data,
              "sweeps": {}, "plots": {}, "plots_refused": {}, "sections": sections}
    for stage in results.values():
        metrics = stage.result.get("metrics") or {}
        _merge(report, _tag({k: v for k, v in metrics.items() if k in METRIC_GROUPS and isinstance(v, dict)}, stage))
        for name, rows in (metrics.get("sweeps") or {}).items():
            report["sweeps"][name] = _tag(rows, stage, f"sweeps.{name}")
        for key in ("gallery", "cards"):
            if metrics.get(key):
                report[key] = metrics[key]
        found, refused = _plots(stage, run_dir)
        report["plots"].update(found)
        report["plots_refused"].update(refused)
    for name, rel in (extra_plots or {}).items():
        if inside_run_dir(run_dir, rel) is not None:
            report["plots"][name] = rel
    ttt = results.get("ttt")
    report["comparisons"] = comparisons(report, preset, ttt.settings.get("space") if ttt else None,
                                        data["paper_data"], ttt.settings if ttt else {})
    report["claims"] = claims(report)
    report["setup"] = setup_card(report, results, data)
    report["provenance"] = provenance(results, versions)
    report["timings"] = {name: {"seconds": r.seconds, "cpu_seconds": r.cpu_seconds, "reused": r.reused}
                         for name, r in results.items()}
    report["timings"]["total_s"] = sum(r.seconds for r in results.values())
    return report


SAME_HEAD = ("downstream.acc_raw", "ttt.global_acc")
"""The probe on raw embeddings and the TTT study's global head: one linear head with the same recipe on the same
split when the TTT study runs on the embeddings, so one number, shown once."""


def _same_head(rows: dict, ttt_settings: dict) -> bool:
    a, b = (rows.get(m) for m in SAME_HEAD)
    if a is None or b is None or ttt_settings.get("space", "embeddings") != "embeddings":
        return False
    return ttt_settings.get("head", "linear") == "linear" and all(
        a["ours"].get(k) == b["ours"].get(k) for k in ("value", "n"))


def comparisons(report: dict, preset: str, ttt_space: str | None = None, paper_data: bool = True,
                ttt_settings: dict | None = None) -> list[dict]:
    """One row per reported headline number: ours, the paper's (only when the run's data is the paper's), the
    verdict in the unit of the measure; the probe on raw embeddings and the global head merged when they are one
    head."""
    paper = paper_values(preset, ttt_space) if paper_data else {}
    rows = {}
    for metric, claim in CLAIMS.items():
        ours = lookup(report, metric)
        if not is_measure(ours):
            continue
        theirs = paper.get(metric)
        verdict = (number_verdict(ours, theirs, unit(metric)) if theirs else
                   "the paper gives no value for it" if paper_data else NOT_PAPER)
        rows[metric] = {"metric": metric, "label": label(metric), "claim": claim, "items": items(metric),
                        "ours": ours, "paper": theirs, "verdict": verdict}
    if _same_head(rows, ttt_settings or {}):
        probe = rows.pop(SAME_HEAD[0])
        head = rows[SAME_HEAD[1]]
        head.update(metric=" = ".join(SAME_HEAD), label="Global linear head on the embeddings (also the reference "
                    "probe: one head, one number)", claim=f"{head['claim']} {probe['claim']}")
    out = list(rows.values())
    for c in (report.get("theory") or {}).get("claims") or []:  # the theory study judges its own claims
        if is_measure(c.get("measured")):
            measured = c["measured"]
            verdict = ("supports the claim" if c.get("holds") else "does not support it") \
                if measured["value"] is not None else f"inconclusive (not measured: {measured.get('provenance')})"
            out.append({"metric": "theory.claims", "label": c["claim"], "claim": c.get("detail") or c["claim"],
                        "items": "",
                        "ours": measured, "paper": None, "paper_text": c.get("paper"), "verdict": verdict,
                        "detail": c.get("detail")})
    return out


def claims(report: dict) -> list[dict]:
    """The paper's qualitative claims that this run's numbers can check (paired where the run has the pairs)."""
    out = [c for spec in DIRECTIONS if (c := direction_claim(spec, lambda m: lookup(report, m))) is not None]
    width = width_verdict(report["sweeps"].get("width") or [])
    if width:
        out.append(width)
    return out


def provenance(results: dict[str, StageResult], versions: dict | None = None) -> dict:
    """Versions of the software, and every stage's directory, key, settings and hashes."""
    import numpy
    import torch

    return {
        "package_version": package_version(), "python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "numpy": numpy.__version__, **(versions or {}),
        "artifacts": {name: {"dir": str(r.dir), "key": r.key, "settings": r.settings,
                             "hashes": {k: v for k, v in r.result.items() if "hash" in k and isinstance(v, str)}}
                      for name, r in results.items()},
    }
