"""Write a run's report: the gallery and image cards, the report's own plots, ``report.json`` and ``report.html``
in the run directory.

The report is rebuilt on every run from the cached stages (it takes a few seconds), so a report always shows
the stages as they are now, drawn by the current plot code.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from analysis.run.cache import StageCache
from analysis.report.datasets import describe_data
from analysis.report.document import build_report
from analysis.report.embed import inside_run_dir
from analysis.report.gallery import StoreImages, build_cards, build_gallery
from analysis.report.html import write_html
from analysis.report.setup import read_json_list, sae_history
from artifacts import ArtifactError, read_json, write_json

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


def _visuals(cache: StageCache, report_dir: Path, seed: int, n_neighbours: int, classes: list | None,
             log) -> tuple[dict, dict]:
    """The concept gallery and the image cards, when the run has codes (``classes``: names the data set is known
    by, when the store only holds label numbers)."""
    if "codes" not in cache.results:
        return {}, {}
    from analysis.concepts.naming import ConceptNamer
    from analysis.run.chain import open_chain

    store, _, codes = open_chain(cache.results)
    assets = report_dir / "assets"
    shutil.rmtree(assets, ignore_errors=True)
    classes = list(classes or store.classes)
    # Both read the same names and images: the source is reopened once (a folder of images is listed once).
    namer, images = ConceptNamer(codes, store.labels, classes), StoreImages(store)
    gallery = build_gallery(store, codes, assets, namer=namer, images=images, classes=classes)
    test = np.asarray(store.split.get("test", np.arange(store.n)))
    rows = np.sort(np.random.default_rng(seed).choice(test, size=min(N_CARDS, len(test)), replace=False))
    try:
        predictions = card_predictions(cache, store, rows, n_neighbours)
    except Exception as e:  # the cards still show concepts and neighbours; the page says predictions are absent
        log(f"report: no predictions on the image cards ({type(e).__name__}: {e})")
        predictions = None
    cards = build_cards(store, codes, assets, rows, n_neighbours=n_neighbours, predictions=predictions, namer=namer,
                        images=images, classes=classes, seed=seed)
    if predictions:
        cards["predictions_note"] = (f"'global head' is the CNN backbone's own last layer, 'after TTT' that layer "
                                     f"after local TTT on the card's {n_neighbours} neighbours")
    return gallery, cards


def own_plots(report: dict, results: dict, report_dir: Path) -> dict:
    """The report's own plots, drawn from the report's numbers (so they follow the current plot code): the TTT
    study's figures with the paired differences, the width figure, the SAE's training curve and frequencies."""
    from analysis.report import plots
    from analysis.report.paper import width_slope
    from analysis.ttt import plots as ttt_plots

    drawn = {}
    ttt, sweeps = report.get("ttt") or {}, report.get("sweeps") or {}
    if all(k in ttt for k in ("global_acc", "ttt_acc", "majority_acc")):
        differences = {"TTT − global head": ttt.get("gain"),
                       "TTT − kNN majority vote": ttt.get("gain_over_majority")}
        drawn["ttt.ttt_accuracy"] = ttt_plots.accuracy_bars(
            {"global": ttt["global_acc"], "TTT": ttt["ttt_acc"], "kNN majority": ttt["majority_acc"]},
            report_dir / "ttt_accuracy.png", "Accuracy on the test points",
            {k: v for k, v in differences.items() if v} or None)
    if all(k in (ttt.get("locality") or {}) for k in ("own_neighbourhood_acc", "whole_test_acc",
                                                      "global_whole_test_acc")):
        drawn["ttt.ttt_locality"] = ttt_plots.locality_bars(ttt["locality"], report_dir / "ttt_locality.png")
    for name, key, xlabel in (("n_neighbours", "n_neighbours", "neighbours per test point"),
                              ("train_size", "n_train", "training rows")):
        if sweeps.get(name):
            drawn[f"ttt.ttt_{name}"] = ttt_plots.sweep_curve(sweeps[name], key, report_dir / f"ttt_{name}.png",
                                                             xlabel, log_x=True)
    if sweeps.get("width"):
        width = (report.get("settings") or {}).get("cnn_width")
        main = next((r["n_features"] for r in sweeps["width"] if r.get("width") == width), None)
        drawn["report.width"] = plots.plot_width(sweeps["width"], report_dir / "width.png",
                                                 width_slope(sweeps["width"]), main)
    history = sae_history(results)
    if history and history["history"]:
        drawn["report.sae_training"] = plots.plot_sae_training(history["history"], history["heldout"],
                                                               report_dir / "sae_training.png")
    if history and (history["heldout"].get("freq_hist") or {}).get("counts"):
        drawn["report.latent_frequency"] = plots.plot_latent_frequency(
            history["heldout"]["freq_hist"], history["heldout"].get("n"), report_dir / "latent_frequency.png")
    return {name: Path(path).relative_to(report_dir.parent).as_posix() for name, path in drawn.items()}


def _record_fingerprints(cache: StageCache, name: str) -> dict:
    """The file fingerprints and digest of stage ``name``'s record (what a rerun checks before reusing it)."""
    try:
        record = read_json(cache.record_path(name))
    except (ArtifactError, OSError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    files = record.get("files") if isinstance(record.get("files"), dict) else {}
    return {"files": {str(k): str(v) for k, v in files.items()}, "digest": record.get("digest")}


def write_report(preset: str, settings: dict, cache: StageCache, sections: dict, log=print) -> dict:
    """Assemble and write ``report.json`` and ``report.html`` into the cache's run directory; returns the report."""
    t0, c0 = time.perf_counter(), time.process_time()
    run_dir = cache.run_dir
    report_dir = run_dir / "report"
    report_dir.mkdir(exist_ok=True)
    results = cache.results
    n_classes = len(read_json_list(Path(results["store"].dir) / "classes.json")) if "store" in results else None
    data = describe_data(preset, results, n_classes)
    gallery, cards = _visuals(cache, report_dir, int(settings.get("seed", 0)), int(settings.get("n_neighbours", 50)),
                              data.get("classes"), log)
    report = build_report(preset, settings, results, sections, run_dir, data=data)
    for name, rel in own_plots(report, results, report_dir).items():
        if inside_run_dir(run_dir, rel) is not None:
            report["plots"][name] = rel
            report["plots_refused"].pop(name, None)
    for name, art in report["provenance"]["artifacts"].items():
        art.update(_record_fingerprints(cache, name))
    if gallery:
        report["gallery"] = gallery
    if cards:
        report["cards"] = cards
    report["timings"]["report"] = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                                   "reused": False}
    report = json.loads(json.dumps(report))  # the canonical JSON form (tuples become lists), as report.json holds it
    write_json(run_dir / "report.json", report)
    write_html(report, run_dir, run_dir / "report.html")
    log(f"report: done in {time.perf_counter() - t0:.1f} s")
    return report
