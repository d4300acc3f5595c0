"""What the report tells a reader is true: intervals that do not collapse at 0 or 1, paired claims tested paired,
differences in the unit of the measure, the union bound a neighbourhood can reach, every setting resolved, the
paper's numbers only beside the paper's data (recognised by content), hostile names drawn as plain text, and only
files inside the run directory on the page."""

import base64
import hashlib
import json

import numpy as np
import pytest

from analysis.concepts import plots as concept_plots
from analysis.report import datasets
from analysis.report.datasets import NOT_PAPER
from analysis.report.document import build_report, lookup
from analysis.report.embed import embed_png
from analysis.report.html import render_html, write_html
from analysis.report.paper import direction_verdict
from analysis.run.cache import StageResult
from analysis.stats import accuracy, format_measure, paired_difference, wilson_interval
from analysis.ttt.plots import accuracy_bars
from embeddings.idx import find_idx_files, idx_fingerprint, write_idx
from test_report import cards_of, gallery_of

MATH = r"$\frac$ and $x^$"
RLO = "\u202eevil.png"
LONG = "a-very-long-class-name-" * 9  # 207 characters


def _stage(name, run_dir, metrics=None, plots=None, settings=None, result=None):
    d = run_dir / name
    d.mkdir(parents=True, exist_ok=True)
    return StageResult(name, "f" * 64, d, result or {"metrics": metrics or {}, "plots": plots or {}}, 1.0, False,
                       settings or {})


def test_wilson_intervals_do_not_collapse_at_0_or_1():
    right, wrong = accuracy(np.ones(50, bool)), accuracy(np.zeros(50, bool))
    assert right["se"] == 0.0 and right["interval"][1] == 1.0 and right["interval"][0] == pytest.approx(0.9287, 1e-3)
    assert wrong["interval"][0] == 0.0 and wrong["interval"][1] == pytest.approx(0.0713, 1e-3)
    assert format_measure(right) == "100.00 % (95% CI 92.87–100.00, n = 50)"
    assert "± 0" not in format_measure(right)
    lo, hi = wilson_interval(7, 10)
    assert lo < 0.7 < hi and lo == pytest.approx(0.3968, 1e-3) and hi == pytest.approx(0.8922, 1e-3)


def test_an_older_proportion_measure_gets_its_interval_in_the_report_and_on_the_page(tmp_path):
    # A locality head accuracy of 1 ± 0 over 100 heads, as written before intervals existed.
    own = {"value": 1.0, "se": 0.0, "n": 100}
    stage = _stage("ttt", tmp_path, {"ttt": {"locality": {"own_neighbourhood_acc": own,
                                                          "whole_test_acc": {"value": 0.3, "se": 0.02, "n": 100}}}})
    report = build_report("digits", {}, {"ttt": stage}, {}, tmp_path)
    m = lookup(report, "ttt.locality.own_neighbourhood_acc")
    assert m["kind"] == "proportion" and 0.9 < m["interval"][0] < 1.0 and m["interval"][1] == 1.0
    page = render_html(report, tmp_path)
    assert "100.00 % (95% CI 96.30–100.00)" in page and "100.00 ± 0.00" not in page


def _correlated(n=400, extra=12, seed=0):
    """kNN majority right on 80 % of the points; TTT right on the same points and ``extra`` more."""
    rng = np.random.default_rng(seed)
    majority = rng.random(n) < 0.8
    ttt = majority.copy()
    ttt[np.flatnonzero(~majority)[:extra]] = True
    return ttt, majority


def test_a_paired_claim_is_tested_on_its_paired_difference(tmp_path):
    ttt, majority = _correlated()
    glob = ttt.copy()
    metrics = {"ttt": {"ttt_acc": accuracy(ttt), "majority_acc": accuracy(majority), "global_acc": accuracy(glob),
                       "gain": paired_difference(ttt, glob), "gain_over_majority": paired_difference(ttt, majority)}}
    # Unpaired, the three extra points in a hundred are within two standard errors ...
    assert direction_verdict(metrics["ttt"]["ttt_acc"], metrics["ttt"]["majority_acc"], ">").startswith("inconclusive")
    report = build_report("digits", {}, {"ttt": _stage("ttt", tmp_path, metrics)}, {}, tmp_path)
    claims = {c["claim"]: c for c in report["claims"]}
    # ... paired (the same points), they are 3.5 standard errors above zero.
    assert claims["TTT beats kNN majority vote"]["verdict"] == "supports the claim"
    assert claims["TTT beats kNN majority vote"]["test"].startswith("paired")
    assert claims["TTT beats kNN majority vote"]["metric"] == "ttt.gain_over_majority"


def test_a_difference_is_stated_in_the_unit_of_its_measure(tmp_path):
    # A mask that keeps no concept (a count of 0 <= 1) is 40 concepts from the paper's, not "-4000.00 points".
    metrics = {"sharing": {"mask_concepts_mean": {"value": 0.0, "se": 0.5, "n": 100}},
               "ttt": {"global_acc": {"value": 0.75, "se": 0.002, "n": 50000}}}
    imagenet = {"name": "ImageNet-1k", "classes": None, "paper_data": True, "evidence": "test"}
    report = build_report("imagenet-clip", {}, {"ttt": _stage("ttt", tmp_path, metrics)}, {}, tmp_path, data=imagenet)
    rows = {r["metric"]: r for r in report["comparisons"]}
    assert rows["sharing.mask_concepts_mean"]["verdict"].startswith("differs by -40 concepts")
    assert rows["ttt.global_acc"]["verdict"].startswith("differs by -3.33 points")


def _capture(monkeypatch):
    figures = []
    monkeypatch.setattr(concept_plots, "save_figure", lambda fig, path: figures.append(fig) or str(path))
    return figures


def test_the_union_histogram_draws_the_bound_a_neighbourhood_can_reach(monkeypatch, tmp_path):
    figures = _capture(monkeypatch)
    rng = np.random.default_rng(0)
    unions = {"neighbours in codes": rng.integers(20, 40, 100), "random baseline": rng.integers(76, 83, 100)}
    concept_plots.plot_unions(unions, {"min": 6, "max": 300, "n_live": 82}, tmp_path / "u.png")
    fig = figures[0]
    vertical = {float(line.get_xdata()[0]) for ax in fig.axes for line in ax.get_lines()}
    assert vertical == {6.0, 82.0}  # k and the 82 live concepts, not n_neighbours·k = 300
    assert fig.axes[0].get_xlim()[1] < 100
    assert "saturates the dictionary" in fig.get_suptitle()
    assert len(fig.axes) == 2  # one panel per series: none hidden under another


def test_every_setting_is_resolved(tmp_path):
    sae = _stage("sae", tmp_path, result={"k": 6, "n_latents": 128, "sae_hash": "a" * 64})
    settings = {"seed": 0, "sae_k": None, "sae_n_latents": None, "n_neighbours": 50}
    report = build_report("digits", settings, {"sae": sae}, {}, tmp_path)
    assert report["settings"]["sae_k"] == 6 and report["settings"]["sae_n_latents"] == 128
    assert "null" not in json.dumps(report["settings"])
    rows = {k: v for section in report["setup"] for k, v in section["rows"]}
    assert rows["latents (concepts)"] == "128" and rows["active per image, k"] == "6"


def _idx_run(tmp_path, gz=True):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", 60), ("t10k", 20)):
        write_idx(data / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 255, (n, 8, 8), dtype=np.uint8))
        write_idx(data / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n).astype(np.uint8))
    backbone = _stage("backbone", tmp_path / "run", settings={"data": {"kind": "idx", "dir": str(data),
                                                                       "sha256": idx_fingerprint(data)}})
    n = 300
    ttt = {"ttt": {"global_acc": accuracy(np.arange(n) % 10 < 8), "ttt_acc": accuracy(np.arange(n) % 10 < 9),
                   "majority_acc": accuracy(np.arange(n) % 10 < 7)}}
    return data, {"backbone": backbone, "ttt": _stage("ttt", tmp_path / "run", ttt)}


def _published(monkeypatch, name, data):
    md5 = {part: hashlib.md5(path.read_bytes()).hexdigest() for part, path in find_idx_files(data).items()}
    monkeypatch.setitem(datasets.KNOWN_IDX, name, {**datasets.KNOWN_IDX[name], "md5": md5})


def test_idx_data_that_is_not_mnist_is_not_compared_with_the_paper(tmp_path):
    data, results = _idx_run(tmp_path)
    report = build_report("mnist", {}, results, {}, tmp_path / "run")
    assert report["data"]["paper_data"] is False and "match no published" in report["data"]["evidence"]
    assert report["comparisons"] and all(r["paper"] is None and r["verdict"] == NOT_PAPER
                                         for r in report["comparisons"])
    assert {c["claim"] for c in report["claims"]} >= {"TTT beats the global head", "TTT beats kNN majority vote"}
    assert "not the paper's data" in render_html(report, tmp_path / "run")


def test_mnist_is_recognised_by_the_content_of_its_files(tmp_path, monkeypatch):
    data, results = _idx_run(tmp_path)
    _published(monkeypatch, "MNIST", data)  # these files stand in for MNIST's published .gz files
    report = build_report("mnist", {}, results, {}, tmp_path / "run")
    assert report["data"]["name"] == "MNIST" and report["data"]["paper_data"] is True
    rows = {r["metric"]: r for r in report["comparisons"]}
    assert rows["ttt.global_acc"]["paper"]["value"] == pytest.approx(0.9857)


def test_fashion_mnist_is_named_with_its_classes_and_not_compared(tmp_path, monkeypatch):
    data, results = _idx_run(tmp_path)
    _published(monkeypatch, "Fashion-MNIST", data)
    report = build_report("mnist", {}, results, {}, tmp_path / "run")
    assert report["data"]["name"] == "Fashion-MNIST" and report["data"]["classes"][0] == "T-shirt/top"
    assert all(r["paper"] is None for r in report["comparisons"])


def test_decompressed_idx_files_alone_say_why_they_are_not_recognised(tmp_path):
    data, results = _idx_run(tmp_path, gz=False)
    found = datasets.describe_data("mnist", results)
    assert found["paper_data"] is False and ".gz" in found["evidence"]


def test_class_names_from_the_data_are_drawn_as_plain_text(tmp_path):
    from analysis.concepts.plots import plot_umap

    coords = np.random.default_rng(0).normal(size=(30, 2))
    path = plot_umap(coords, np.arange(30) % 3, MATH, tmp_path / "u.png", legend=[MATH, LONG, RLO])
    assert (tmp_path / "u.png").stat().st_size > 0 and path.endswith("u.png")
    accuracy_bars({"global": accuracy([1, 0]), "TTT": accuracy([1, 1])}, tmp_path / "a.png", MATH)


def test_hostile_names_on_the_page_are_plain_text_and_cut(tmp_path):
    report = build_report("digits", {}, {}, {}, tmp_path)
    report["gallery"], report["cards"] = gallery_of(RLO), cards_of(LONG)
    report["cards"].update(chosen="six test images", space="the embeddings", images_note=None)
    report["cards"]["cards"][0]["label"] = MATH
    page = render_html(report, tmp_path)
    assert "\u202e" not in page and "&lt;U+202E&gt;evil.png" in page
    assert MATH in page  # the page shows math text as it is written
    visible = page.replace(f'title="{LONG}"', "")
    assert LONG not in visible and LONG[:47] + "…" in visible


def test_a_file_name_that_is_not_utf8_does_not_stop_the_page(tmp_path):
    name = b"caf\xe9.png".decode("utf-8", "surrogateescape")
    report = build_report("digits", {}, {}, {}, tmp_path)
    report["cards"] = cards_of(name)
    write_html(report, tmp_path, tmp_path / "report.html")
    assert "caf\\xe9.png" in (tmp_path / "report.html").read_text(encoding="utf-8")


def test_only_files_inside_the_run_directory_reach_the_page(tmp_path):
    from PIL import Image

    run = tmp_path / "run"
    outside = tmp_path / "outside.png"
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(outside)
    stage = _stage("ttt", run, plots={"passwd": "/etc/passwd", "up": "../../outside.png", "link": "link.png"})
    (stage.dir / "link.png").symlink_to(outside)
    report = build_report("digits", {}, {"ttt": stage}, {}, run)
    assert report["plots"] == {}
    assert all("outside the run directory" in why for why in report["plots_refused"].values())
    report["cards"] = cards_of("x", image="../../outside.png")
    page = render_html(report, run)
    secret = base64.b64encode(outside.read_bytes()).decode()
    assert secret not in page and "data:image/png" not in page
    assert page.count("outside the run directory") >= 3
    (run / "notpng.png").write_text("root:x:0:0")
    assert embed_png(run, "notpng.png")["uri"] is None and embed_png(run, "/etc/passwd")["uri"] is None


def test_the_concept_study_records_the_live_latents_that_bound_a_union(tmp_path):
    from analysis.concepts.sharing import ConceptConfig, concept_study
    from embeddings.store import EmbeddingStore
    from sae.checkpoint import load_sae
    from sae.codes import CodeStore
    from synthetic_concepts import planted_artifacts

    store_dir, sae_dir, codes_dir = planted_artifacts(tmp_path / "study")
    store, codes = EmbeddingStore.open(store_dir), CodeStore.open(codes_dir)
    config = ConceptConfig(n_neighbours=8, probe=False, umap=False, n_bootstrap=2)
    bounds = concept_study(store, load_sae(sae_dir), codes, config, tmp_path / "out")["sharing"]["union_bounds"]
    train = np.asarray(store.split["train"])
    values, indices = np.asarray(codes.values)[train], np.asarray(codes.indices)[train]
    assert bounds["n_live"] == np.unique(indices[values > 0]).size <= codes.n_latents
    assert concept_plots.union_reach(bounds)[0] == min(bounds["n_live"], 8 * codes.k)


def test_plots_of_a_run_directory_given_relative_to_the_working_directory_are_found(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "digits"
    stage = _stage("concepts", run, plots={"union_hist": "union_hist.png"})
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(stage.dir / "union_hist.png")
    stage.dir = stage.dir.relative_to(tmp_path)  # as reproduce("digits", Path("digits")) records it
    report = build_report("digits", {}, {"concepts": stage}, {}, run.relative_to(tmp_path))
    assert report["plots"] == {"concepts.union_hist": "concepts/union_hist.png"} and not report["plots_refused"]
