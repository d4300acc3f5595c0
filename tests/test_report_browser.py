"""The report page in a real headless browser (Debian's chromium via selenium): it loads from disk with no console
errors, every image decodes, the summary table is there, a hostile class name shows as text, a screenshot is saved.

Skipped, with the reason, when chromium, chromedriver or selenium is missing (``.ci/run`` installs them when it can).
"""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from analysis.run.cache import StageResult
from analysis.report.document import build_report
from analysis.report.html import write_html
from analysis.report.plots import plot_accuracies, plot_n_neighbours, plot_width
from analysis.stats import accuracy, paired_difference
from headless_browser import BrowserUnavailable, open_browser

EVIL = "<script>alert(1)</script>"
SCREENSHOT_ENV = "REPORT_SCREENSHOT_DIR"
"""When set, the screenshot is also copied into this folder (to look at it, or to publish it)."""


@pytest.fixture(scope="module")
def browser():
    try:
        driver = open_browser()
    except BrowserUnavailable as e:
        pytest.skip(str(e))
    yield driver
    driver.quit()


def _measures(rng, p, n=300):
    return accuracy(rng.random(n) < p)


def _page(tmp_path: Path) -> Path:
    """A report of synthetic numbers with real plots, a gallery and cards whose class name is a script tag."""
    rng = np.random.default_rng(0)
    ttt_dir = tmp_path / "ttt"
    ttt_dir.mkdir()
    glob, ttt = rng.random(300) < 0.8, rng.random(300) < 0.9
    metrics = {"ttt": {"global_acc": accuracy(glob), "ttt_acc": accuracy(ttt), "majority_acc": _measures(rng, 0.7),
                       "gain": paired_difference(ttt, glob)}}
    plot_accuracies({"global": metrics["ttt"]["global_acc"], "TTT": metrics["ttt"]["ttt_acc"], EVIL: _measures(rng, .7)},
                    ttt_dir / "acc.png", EVIL)
    nn = [{"n_neighbours": k, "ttt_acc": _measures(rng, 0.9), "global_acc": _measures(rng, 0.8)} for k in (5, 20, 50)]
    plot_n_neighbours(nn, ttt_dir / "nn.png")
    width = [{"width": w, "n_features": 25 * w, "global_acc": _measures(rng, 0.8 + w / 100),
              "ttt_acc": _measures(rng, 0.9), "gain": paired_difference(rng.random(300) < .9, rng.random(300) < .8)}
             for w in (1, 4, 16)]
    plot_width(width, ttt_dir / "width.png")
    metrics["sweeps"] = {"n_neighbours": nn, "width": width}
    stage = StageResult("ttt", "a" * 64, ttt_dir, {"metrics": metrics, "plots": {"accuracy": "acc.png", "nn": "nn.png",
                                                                                  "width": "width.png"}}, 2.0, False)
    report = build_report("digits", {"data": EVIL}, {"ttt": stage},
                          {"ttt": {"status": "ok", "reason": ""}, "concepts": {"status": "missing", "reason": EVIL}},
                          tmp_path)
    assets = tmp_path / "report" / "assets"
    assets.mkdir(parents=True)
    for r in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(assets / f"row{r}.png")
    report["gallery"] = {"concepts": [{"latent": 7, "n_rows": 40, "frequency": 0.2, "description": f"mostly {EVIL!r}",
                                       "top_rows": [0, 1], "top_ids": [EVIL, "b"],
                                       "images": ["assets/row0.png", "assets/row1.png"]}]}
    report["cards"] = {"cards": [{"row": 2, "id": EVIL, "label": EVIL, "image": "assets/row2.png", "union": 9,
                                  "global": "3", "ttt": EVIL, "concepts": [{"latent": 7, "shared_by": 3,
                                                                           "description": EVIL}],
                                  "neighbours": [{"row": 3, "label": EVIL, "image": "assets/row3.png"}]}]}
    return write_html(report, tmp_path, tmp_path / "report.html")


def test_page_in_headless_chromium(browser, tmp_path):
    page = _page(tmp_path)
    browser.get(page.as_uri())
    errors = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
    assert errors == []
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.alt])")
    assert len(images) == 3 + 2 + 2  # three plots, two gallery thumbnails, a card's image and its neighbour
    assert all(done and w > 0 and h > 0 for done, w, h, _ in images), images
    rows = browser.execute_script("return document.querySelectorAll('#summary tr').length")
    assert rows >= 4  # the header and one row per TTT number
    assert browser.execute_script("return document.scripts.length") == 0
    text = browser.execute_script("return document.body.innerText")
    assert EVIL in text  # shown as text ...
    assert browser.execute_script("return window.alertCalled === undefined")
    height = browser.execute_script("return document.body.scrollHeight")
    browser.set_window_size(1280, min(max(height, 900), 6000))
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    with Image.open(shot) as im:
        assert im.size[0] >= 1000 and im.size[1] >= 900
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copy(shot, Path(os.environ[SCREENSHOT_ENV]) / "report_test_page.png")


def test_no_alert_ran(browser, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException

    browser.get(_page(tmp_path).as_uri())
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # ... and never run
