"""report.json assembly, the paper's values and verdicts, and the HTML page (self-contained, escaped)."""

import math
import re

import numpy as np
import pytest

from analysis.run.cache import StageResult
from analysis.report.document import SCHEMA, build_report, lookup
from analysis.report.html import render_html
from analysis.report.paper import direction_verdict, number_verdict, width_slope, width_verdict
from analysis.stats import accuracy, paired_difference
from analysis.ttt.plots import accuracy_bars

EVIL = "<script>alert(1)</script>"


def gallery_of(text, image=None):
    """A gallery whose every string is ``text``."""
    shown = [{"row": 1, "id": text, "label": text, "activation": 2.5, "image": image}]
    return {"concepts": [{"latent": 3, "n_rows": 5, "frequency": 0.5, "all_labels": {text: 4, "b": 1},
                          "purity": 0.8, "shown": shown, "shown_labels": {text: 1}}],
            "order": text, "chosen": text, "images_note": text}


def cards_of(text, image=None, neighbour_image=None):
    """Image cards whose every string is ``text``."""
    return {"cards": [{"row": 1, "id": text, "label": text, "image": image, "union": 4, "global": text, "ttt": text,
                       "concepts": [{"latent": 1, "shared_by": 2, "n_rows": 9, "frequency": 0.1, "top_label": text,
                                     "purity": 0.5}],
                       "neighbours": [{"row": 2, "id": text, "label": text, "similarity": 0.9,
                                       "image": neighbour_image}],
                       "neighbour_labels": {text: 1}}],
            "space": text, "n_shown": 16, "n_neighbours": 1, "chosen": text, "images_note": text}


def _stage(name, tmp_path, metrics, plots=None, key="f" * 64):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    return StageResult(name, key, d, {"metrics": metrics, "plots": plots or {}}, 1.5, False, {"x": 1})


def _ttt_metrics(n=400, seed=0):
    rng = np.random.default_rng(seed)
    glob = rng.random(n) < 0.8
    ttt = glob | (rng.random(n) < 0.5)
    return {"ttt": {"global_acc": accuracy(glob), "ttt_acc": accuracy(ttt), "majority_acc": accuracy(rng.random(n) < 0.9),
                    "gain": paired_difference(ttt, glob),
                    "locality": {"own_neighbourhood_acc": accuracy(np.ones(n, bool)),
                                 "whole_test_acc": accuracy(rng.random(n) < 0.4)}}}


def test_number_verdicts():
    assert number_verdict({"value": 0.99, "se": 0.001}, {"value": 0.9901, "se": 0.001}, "points") \
        == "agrees within error"
    far = number_verdict({"value": 0.95, "se": 0.001}, {"value": 0.99, "se": 0.001}, "points")
    assert far.startswith("differs by -4.00 points") and "SE" in far
    assert number_verdict({"value": 150.0, "se": 2.0}, {"value": 180.0, "se": None}, "concepts") \
        .startswith("differs by -30 concepts")


def test_direction_verdicts():
    assert direction_verdict({"value": 0.05, "se": 0.01}, None, ">") == "supports the claim"
    assert direction_verdict({"value": 0.005, "se": 0.01}, None, ">").startswith("inconclusive")
    assert direction_verdict({"value": -0.05, "se": 0.01}, None, ">") == "contradicts it"
    assert direction_verdict({"value": 30, "se": 1}, {"value": 80, "se": 1}, "<") == "supports the claim"
    rows = [{"n_features": 25, "gain": {"value": 0.1, "se": 0.01, "n": 300}},
            {"n_features": 400, "gain": {"value": 0.0, "se": 0.01, "n": 300}}]
    assert width_verdict(rows)["verdict"] == "supports the claim"
    assert width_verdict(rows[:1]) is None


MNIST = {"name": "MNIST", "classes": [str(i) for i in range(10)], "paper_data": True, "evidence": "test"}


def test_report_has_the_schema_and_paper_comparisons(tmp_path):
    results = {"ttt": _stage("ttt", tmp_path, _ttt_metrics())}
    sections = {"ttt": {"status": "ok", "reason": ""}, "concepts": {"status": "missing", "reason": "not here"}}
    report = build_report("mnist", {"seed": 0}, results, sections, tmp_path, data=MNIST)
    assert report["schema"] == SCHEMA and report["preset"] == "mnist"
    m = lookup(report, "ttt.locality.whole_test_acc")
    assert set(m) >= {"value", "se", "n", "stage", "stage_key"} and m["stage"] == "ttt"
    rows = {r["metric"]: r for r in report["comparisons"]}
    assert rows["ttt.global_acc"]["paper"]["value"] == pytest.approx(0.9857)
    assert rows["ttt.global_acc"]["verdict"].startswith(("agrees", "differs"))
    assert "sharing" not in report  # the missing concept study leaves no numbers behind
    assert report["sections"]["concepts"]["status"] == "missing"
    assert report["timings"]["ttt"] == {"seconds": 1.5, "cpu_seconds": None, "reused": False}
    assert report["provenance"]["artifacts"]["ttt"]["key"] == "f" * 64
    claims = {c["claim"]: c["verdict"] for c in report["claims"]}
    assert claims["TTT beats the global head"] == "supports the claim"


def test_digits_preset_has_no_paper_values_but_checks_directions(tmp_path):
    report = build_report("digits", {}, {"ttt": _stage("ttt", tmp_path, _ttt_metrics())}, {}, tmp_path)
    assert all(r["paper"] is None for r in report["comparisons"])
    assert all(r["verdict"] == "not the paper's data: not compared" for r in report["comparisons"])
    assert report["claims"]


def test_page_is_self_contained_and_escapes_every_string(tmp_path):
    (tmp_path / "ttt").mkdir()
    accuracy_bars({"global": accuracy([1, 0, 1]), "TTT": accuracy([1, 1, 1])}, tmp_path / "ttt" / "acc.png", EVIL)
    results = {"ttt": _stage("ttt", tmp_path, _ttt_metrics(), plots={EVIL: "acc.png"})}
    report = build_report("digits", {"data": EVIL}, results, {EVIL: {"status": "missing", "reason": EVIL}}, tmp_path)
    report["gallery"] = gallery_of(EVIL)
    report["cards"] = cards_of(EVIL)
    page = render_html(report, tmp_path)
    assert "<script" not in page.lower() and "onerror" not in page.lower()
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 8
    assert "<script" not in page.replace("&lt;script", "")
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert 'id=summary' in page and "http://" not in page and "https://" not in page


def test_a_missing_plot_file_is_said_not_hidden(tmp_path):
    results = {"ttt": _stage("ttt", tmp_path, _ttt_metrics(), plots={"gone": "gone.png"})}
    report = build_report("digits", {}, results, {}, tmp_path)
    assert "gone" not in report["plots"] and "missing" in report["plots_refused"]["ttt.gone"]
    assert "gone.png: missing" in render_html(report, tmp_path)


def test_no_numbers_at_all_says_so(tmp_path):
    page = render_html(build_report("digits", {}, {}, {"ttt": {"status": "missing", "reason": "r"}}, tmp_path), tmp_path)
    assert "No headline number could be computed" in page


def test_paper_ttt_values_follow_the_space_the_study_ran_in(tmp_path):
    stage = _stage("ttt", tmp_path, _ttt_metrics())
    imagenet = {**MNIST, "name": "ImageNet-1k"}
    raw = {r["metric"]: r for r in build_report("imagenet-clip", {}, {"ttt": stage}, {}, tmp_path,
                                                 data=imagenet)["comparisons"]}
    assert raw["ttt.global_acc"]["paper"]["value"] == pytest.approx(0.7833)
    stage.settings = {"space": "codes"}
    codes = {r["metric"]: r for r in build_report("imagenet-clip", {}, {"ttt": stage}, {}, tmp_path,
                                                   data=imagenet)["comparisons"]}
    assert codes["ttt.global_acc"]["paper"]["value"] == pytest.approx(0.7145)


def test_width_verdict_fits_every_width_whatever_the_order_given():
    rows = [{"n_features": 400, "gain": {"value": 0.0, "se": 0.01, "n": 300}},
            {"n_features": 25, "gain": {"value": 0.1, "se": 0.01, "n": 300}},
            {"n_features": 100, "gain": {"value": 0.05, "se": 0.01, "n": 300}}]  # e.g. --widths 16,1,4
    verdict = width_verdict(rows)
    assert verdict["verdict"] == "supports the claim"
    assert verdict["measured"]["value"] == pytest.approx(-0.025) and verdict["measured"]["n"] == 3
    assert verdict["against"].index("at 25 features") < verdict["against"].index("at 400")


def test_width_slope_weighs_every_width_not_the_two_ends():
    # The ends alone (+2 at 25, +2 at 400 features) show no trend; the three widths between fall steeply.
    rows = [{"n_features": f, "gain": {"value": g, "se": 0.005, "n": 300}}
            for f, g in ((25, 0.02), (50, 0.10), (100, 0.06), (200, 0.02), (400, 0.02))]
    slope = width_slope(rows)
    assert slope["value"] < 0 and slope["se"] == pytest.approx(0.005 / math.sqrt(10))
    assert width_verdict(rows)["verdict"] == "supports the claim"
    assert width_slope(rows[:1]) is None


def test_a_theory_claim_without_a_measurement_is_inconclusive_and_rendered(tmp_path):
    # theory.rate_slopes finds too few points (e.g. --study-set n_neighbours_values=[5,10]): value None.
    missing = {"value": None, "se": None, "n": 0, "provenance": "too few points to fit"}
    claims = [{"claim": "falls as 1/n_neighbours", "paper": "slope ≈ −1", "measured": missing, "holds": False},
              {"claim": "TTT beats global", "paper": "p", "measured": {"value": 0.5, "se": 0.1, "n": 3}, "holds": True}]
    results = {"theory": _stage("theory", tmp_path, {"theory": {"claims": claims}})}
    report = build_report("theory", {}, results, {"theory": {"status": "ok", "reason": ""}}, tmp_path)
    rows = {r["claim"]: r for r in report["comparisons"]}
    assert rows["falls as 1/n_neighbours"]["verdict"].startswith("inconclusive")
    assert rows["TTT beats global"]["verdict"] == "supports the claim"
    page = render_html(report, tmp_path)
    assert "too few points to fit" in page


def test_a_measure_without_a_standard_error_is_never_a_confident_verdict():
    # measure() of one sample has se None (unknown), not 0: no test can support, contradict or agree with it.
    single = {"value": 0.05, "se": None, "n": 1}
    assert direction_verdict(single, None, ">").startswith("inconclusive")
    assert direction_verdict({"value": 0.9, "se": 0.01, "n": 100}, single, ">").startswith("inconclusive")
    assert number_verdict({"value": 0.9, "se": None, "n": 1}, {"value": 0.99, "se": 0.001}).startswith("inconclusive")
    # an SE of exactly 0 (every point right) is known, and still decides
    assert direction_verdict({"value": 1.0, "se": 0.0, "n": 50}, {"value": 0.3, "se": 0.02, "n": 50}, ">") \
        == "supports the claim"


def test_the_page_templates_ship_with_the_package():
    import tomllib
    from fnmatch import fnmatch
    from pathlib import Path

    from analysis.report.html import TEMPLATES

    config = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["analysis.report"]
    files = [p.relative_to(TEMPLATES.parent).as_posix() for p in TEMPLATES.iterdir() if p.is_file()]
    assert len(files) >= 3 and all(any(fnmatch(f, g) for g in globs) for f in files), (files, globs)
    assert any(d.lower().startswith("jinja2") for d in config["project"]["dependencies"])
