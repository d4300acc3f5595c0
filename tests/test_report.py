"""report.json assembly, the paper's values and verdicts, and the HTML page (self-contained, escaped)."""

import re

import numpy as np
import pytest

from analysis.run.cache import StageResult
from analysis.report.document import SCHEMA, build_report, lookup
from analysis.report.html import render_html
from analysis.report.paper import direction_verdict, number_verdict, width_verdict
from analysis.report.plots import plot_accuracies
from analysis.stats import accuracy, paired_difference

EVIL = "<script>alert(1)</script>"


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
    assert number_verdict({"value": 0.99, "se": 0.001}, {"value": 0.9901, "se": 0.001}) == "agrees within error"
    far = number_verdict({"value": 0.95, "se": 0.001}, {"value": 0.99, "se": 0.001})
    assert far.startswith("differs by -4.00 points") and "SE" in far
    assert number_verdict({"value": 150.0, "se": 2.0}, {"value": 180.0, "se": None}).startswith("differs by -30")


def test_direction_verdicts():
    assert direction_verdict({"value": 0.05, "se": 0.01}, None, ">") == "supports the claim"
    assert direction_verdict({"value": 0.005, "se": 0.01}, None, ">").startswith("inconclusive")
    assert direction_verdict({"value": -0.05, "se": 0.01}, None, ">") == "contradicts it"
    assert direction_verdict({"value": 30, "se": 1}, {"value": 80, "se": 1}, "<") == "supports the claim"
    rows = [{"n_features": 25, "gain": {"value": 0.1, "se": 0.01}},
            {"n_features": 400, "gain": {"value": 0.0, "se": 0.01}}]
    assert width_verdict(rows)["verdict"] == "supports the claim"
    assert width_verdict(rows[:1]) is None


def test_report_has_the_schema_and_paper_comparisons(tmp_path):
    results = {"ttt": _stage("ttt", tmp_path, _ttt_metrics())}
    sections = {"ttt": {"status": "ok", "reason": ""}, "concepts": {"status": "missing", "reason": "not here"}}
    report = build_report("mnist", {"seed": 0}, results, sections, tmp_path)
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
    assert report["claims"]


def test_page_is_self_contained_and_escapes_every_string(tmp_path):
    (tmp_path / "ttt").mkdir()
    plot_accuracies({"global": accuracy([1, 0, 1]), EVIL: accuracy([1, 1, 1])}, tmp_path / "ttt" / "acc.png", EVIL)
    results = {"ttt": _stage("ttt", tmp_path, _ttt_metrics(), plots={EVIL: "acc.png"})}
    report = build_report("digits", {"data": EVIL}, results, {EVIL: {"status": "missing", "reason": EVIL}}, tmp_path)
    report["gallery"] = {"concepts": [{"latent": 3, "n_rows": 5, "frequency": 0.5, "description": f"mostly '{EVIL}'",
                                       "top_rows": [1], "top_ids": [EVIL], "images": [None]}], "images_note": EVIL}
    report["cards"] = {"cards": [{"row": 1, "id": EVIL, "label": EVIL, "image": None, "union": 4, "global": EVIL,
                                  "ttt": EVIL, "concepts": [{"latent": 1, "shared_by": 2, "description": EVIL}],
                                  "neighbours": [{"row": 2, "label": EVIL, "image": None}]}]}
    page = render_html(report, tmp_path)
    assert "<script" not in page.lower() and "onerror" not in page.lower()
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 8
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert 'id=summary' in page and "http://" not in page and "https://" not in page


def test_a_missing_plot_file_is_said_not_hidden(tmp_path):
    results = {"ttt": _stage("ttt", tmp_path, _ttt_metrics(), plots={"gone": "gone.png"})}
    page = render_html(build_report("digits", {}, results, {}, tmp_path), tmp_path)
    assert "is missing" in page


def test_no_numbers_at_all_says_so(tmp_path):
    page = render_html(build_report("digits", {}, {}, {"ttt": {"status": "missing", "reason": "r"}}, tmp_path), tmp_path)
    assert "No headline number could be computed" in page


def test_paper_ttt_values_follow_the_space_the_study_ran_in(tmp_path):
    stage = _stage("ttt", tmp_path, _ttt_metrics())
    raw = {r["metric"]: r for r in build_report("imagenet-clip", {}, {"ttt": stage}, {}, tmp_path)["comparisons"]}
    assert raw["ttt.global_acc"]["paper"]["value"] == pytest.approx(0.7833)
    stage.settings = {"space": "codes"}
    codes = {r["metric"]: r for r in build_report("imagenet-clip", {}, {"ttt": stage}, {}, tmp_path)["comparisons"]}
    assert codes["ttt.global_acc"]["paper"]["value"] == pytest.approx(0.7145)


def test_width_verdict_compares_narrowest_with_widest_whatever_the_order_given():
    rows = [{"n_features": 400, "gain": {"value": 0.0, "se": 0.01}},
            {"n_features": 25, "gain": {"value": 0.1, "se": 0.01}},
            {"n_features": 100, "gain": {"value": 0.05, "se": 0.01}}]  # e.g. --widths 16,1,4
    verdict = width_verdict(rows)
    assert verdict["verdict"] == "supports the claim"
    assert verdict["measured"].index("at 25 features") < verdict["measured"].index("at 400")


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
