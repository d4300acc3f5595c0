"""Write a run's report: the gallery and image cards, ``report.json`` and ``report.html`` in the run directory.

The report is rebuilt on every run from the cached stages (it takes a second or two), so a report always shows
the stages as they are now.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from analysis.run.cache import StageCache
from analysis.report.document import build_report
from analysis.report.gallery import StoreImages, build_cards, build_gallery
from analysis.report.html import write_html
from artifacts import write_json

N_CARDS = 6


def card_predictions(cache: StageCache, store, rows: np.ndarray, n_neighbours: int) -> dict | None:
    """Global and TTT predictions of the card rows, from the CNN backbone's own head (CNN presets only)."""
    if "backbone" not in cache.results:
        return None
    try:
        from analysis.ttt.scaling import cnn_head
        from analysis.local_ttt import LocalTTT, TTTConfig
        from embeddings.cnn import load_cnn
    except ImportError:
        return None
    head = cnn_head(load_cnn(cache.results["backbone"].dir))
    train = np.asarray(store.split["train"])
    x = np.asarray(store.x, dtype=np.float32)
    ttt = LocalTTT(head, TTTConfig(n_neighbours=min(n_neighbours, len(train)), metric="l2"))
    result = ttt.fit(x[train], store.labels[train]).predict(x[rows])
    return {"global": dict(zip(map(int, rows), map(int, result.global_predictions))),
            "ttt": dict(zip(map(int, rows), map(int, result.predictions)))}


def _visuals(cache: StageCache, report_dir: Path, seed: int, n_neighbours: int, log) -> tuple[dict, dict]:
    """The concept gallery and the image cards, when the run has codes."""
    if "codes" not in cache.results:
        return {}, {}
    from analysis.run.chain import open_chain

    store, _, codes = open_chain(cache.results)
    assets = report_dir / "assets"
    shutil.rmtree(assets, ignore_errors=True)
    from analysis.concepts.naming import ConceptNamer

    # Both read the same names and images: the source is reopened once (a folder of images is listed once).
    namer, images = ConceptNamer(codes, store.labels, store.classes), StoreImages(store)
    gallery = build_gallery(store, codes, assets, namer=namer, images=images)
    test = np.asarray(store.split.get("test", np.arange(store.n)))
    rows = np.sort(np.random.default_rng(seed).choice(test, size=min(N_CARDS, len(test)), replace=False))
    try:
        predictions = card_predictions(cache, store, rows, n_neighbours)
    except Exception as e:  # the cards still show concepts and neighbours; the page says predictions are absent
        log(f"report: no predictions on the image cards ({type(e).__name__}: {e})")
        predictions = None
    cards = build_cards(store, codes, assets, rows, predictions=predictions, namer=namer, images=images)
    if predictions:
        cards["predictions_note"] = (f"'global' is the CNN backbone's own head, 'TTT' that head after local TTT on the "
                                     f"{n_neighbours} nearest training embeddings (L2)")
    return gallery, cards


def _own_plots(cache: StageCache, report_dir: Path) -> dict:
    """The report's own plots, drawn from the sweep rows at report time (so they follow the current plot code)."""
    from analysis.report.plots import plot_width

    stage = cache.results.get("width")
    width = stage and stage.result.get("metrics", {}).get("sweeps", {}).get("width")
    if not width:
        return {}
    plot_width(width, report_dir / "width.png")
    return {"report.width": "report/width.png"}


def write_report(preset: str, settings: dict, cache: StageCache, sections: dict, log=print) -> dict:
    """Assemble and write ``report.json`` and ``report.html`` into the cache's run directory; returns the report."""
    t0, c0 = time.perf_counter(), time.process_time()
    run_dir = cache.run_dir
    report_dir = run_dir / "report"
    report_dir.mkdir(exist_ok=True)
    gallery, cards = _visuals(cache, report_dir, int(settings.get("seed", 0)), int(settings.get("n_neighbours", 50)), log)
    report = build_report(preset, settings, cache.results, sections, run_dir, extra_plots=_own_plots(cache, report_dir))
    if gallery:
        report["gallery"] = gallery
    if cards:
        report["cards"] = cards
    report["timings"]["report"] = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                                   "reused": False}
    report = json.loads(json.dumps(report))  # the canonical JSON form (tuples become lists), as report.json holds it
    write_json(run_dir / "report.json", report)
    write_html(report, run_dir, run_dir / "report.html")
    log(f"report: {run_dir / 'report.json'} and {run_dir / 'report.html'} ({time.perf_counter() - t0:.1f} s)")
    return report
