"""The report page in a real headless browser (Debian's chromium via selenium).

The digits report (a tiny digits run made here, or the run named by ``REPORT_RUN_DIR``): it loads from disk with
no console errors, every image decodes, every figure's smallest text is at least 10 px as shown at the page's
width, nothing overflows the page sideways, and screenshots of the whole page are saved (their paths printed;
also copied into ``REPORT_SCREENSHOT_DIR`` when set). A page of hostile names: a script tag shows as text and never
runs, a 200-character class name does not widen the layout, a right-to-left override does not reverse the text.

Skipped, with the reason, when chromium, chromedriver or selenium is missing (``.ci/run`` installs them when it can).
"""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from analysis.report.document import build_report
from analysis.report.html import write_html
from headless_browser import BrowserUnavailable, open_browser
from test_report import cards_of, gallery_of

EVIL = "<script>alert(1)</script>"
RLO = "\u202eevil.png"
LONG = "a-very-long-class-name-" * 9
SCREENSHOT_ENV = "REPORT_SCREENSHOT_DIR"
"""When set, the screenshots are also copied into this folder (to look at them, or to publish one)."""
RUN_ENV = "REPORT_RUN_DIR"
"""When set, the browser opens this run directory's report.html instead of making a tiny digits run."""
MIN_FONT_PX = 10.0
WINDOW = (1280, 900)


@pytest.fixture(scope="module")
def browser():
    try:
        driver = open_browser()
    except BrowserUnavailable as e:
        pytest.skip(str(e))
    driver.set_window_size(*WINDOW)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def digits_report(tmp_path_factory) -> Path:
    if os.environ.get(RUN_ENV):
        return Path(os.environ[RUN_ENV]) / "report.html"
    from analysis.run.presets import reproduce
    from test_presets import TINY

    out = tmp_path_factory.mktemp("runs") / "digits"
    reproduce("digits", out, log=lambda _: None, **TINY)  # no UMAP maps: their first run compiles for a minute
    return out / "report.html"


def screenshots(browser, out_dir: Path, stem: str) -> list[Path]:
    """The whole page as viewport-sized screenshots, top to bottom; their paths are printed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    step = browser.execute_script("return window.innerHeight")
    paths = []
    for i, top in enumerate(range(0, height, step)):
        browser.execute_script(f"window.scrollTo(0, {top})")
        path = out_dir / f"{stem}_{i:02d}.png"
        assert browser.save_screenshot(str(path))
        paths.append(path)
    for path in paths:
        print(f"screenshot: {path}")
        if os.environ.get(SCREENSHOT_ENV):
            shutil.copy(path, Path(os.environ[SCREENSHOT_ENV]) / path.name)
    return paths


def _no_console_errors(browser) -> None:
    errors = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
    assert errors == []


def _images(browser) -> list[dict]:
    return browser.execute_script(
        "return Array.from(document.images).map(i => ({done: i.complete, natural: i.naturalWidth, "
        "height: i.naturalHeight, shown: i.getBoundingClientRect().width, plot: i.classList.contains('plot'), "
        "font: i.dataset.minFontPx ? parseFloat(i.dataset.minFontPx) : null, alt: i.alt}))")


def test_the_digits_report_in_headless_chromium(browser, digits_report, tmp_path):
    browser.get(digits_report.as_uri())
    _no_console_errors(browser)
    images = _images(browser)
    plots = [i for i in images if i["plot"]]
    assert len(plots) >= 8, [i["alt"] for i in plots]
    assert all(i["done"] and i["natural"] > 0 and i["height"] > 0 for i in images), images
    for i in plots:  # the smallest text of each figure, as the page shows it
        scale = i["shown"] / i["natural"]
        if i["font"] is None:
            assert scale > 0.999, f"{i['alt']}: no recorded font size and shown at {scale:.2f} of its size"
        else:
            assert i["font"] * scale >= MIN_FONT_PX, f"{i['alt']}: {i['font'] * scale:.1f} px text"
    assert browser.execute_script("return document.scripts.length") == 0
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    for table in ("summary", "claims", "gallery", "artifacts"):
        assert browser.execute_script(f"return document.querySelectorAll('#{table} tr').length") >= 2, table
    text = browser.execute_script("return document.body.innerText")
    assert "Setup" in text and "95% CI" in text and "null" not in text
    assert "± 0.00 %" not in text
    shots = screenshots(browser, tmp_path / "screenshots", "digits_report")
    with Image.open(shots[0]) as im:
        assert im.size[0] >= 1000


def _hostile_page(tmp_path: Path) -> Path:
    """A report whose class names and ids are a script tag, a right-to-left override and 200 characters."""
    rng = np.random.default_rng(0)
    assets = tmp_path / "report" / "assets"
    assets.mkdir(parents=True)
    for r in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(assets / f"row{r}.png")
    report = build_report("digits", {"data": EVIL}, {}, {"concepts": {"status": "missing", "reason": EVIL}}, tmp_path)
    report["gallery"] = gallery_of(RLO, image="assets/row0.png")
    report["cards"] = cards_of(LONG, image="assets/row1.png", neighbour_image="assets/row2.png")
    report["cards"].update(chosen="one test image", space="the embeddings", images_note=None)
    report["cards"]["cards"][0].update(id=EVIL, ttt=EVIL)
    return write_html(report, tmp_path, tmp_path / "report.html")


def test_hostile_names_show_as_plain_text_in_chromium(browser, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException

    browser.get(_hostile_page(tmp_path).as_uri())
    _no_console_errors(browser)
    images = _images(browser)
    assert len(images) == 3 and all(i["done"] and i["natural"] > 0 for i in images)
    text = browser.execute_script("return document.body.innerText")
    assert EVIL in text and "\u202e" not in text and "<U+202E>evil.png" in text
    assert LONG not in text and LONG[:47] + "…" in text
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # the script tag never ran
    screenshots(browser, tmp_path / "screenshots", "hostile_names")
