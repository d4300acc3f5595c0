"""A headless Chromium for the report's browser tests (Debian's ``chromium`` and ``chromedriver`` via selenium).

``open_browser()`` returns a driver or raises ``BrowserUnavailable`` with the reason the tests skip with.
"""

from __future__ import annotations

import shutil
import tempfile

CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER_PATHS = ("/usr/bin/chromedriver",)
# Flags that keep headless Chromium working on a machine without network, as root, without a GPU.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--allow-file-access-from-files", "--window-size=1280,900")


class BrowserUnavailable(RuntimeError):
    """No headless browser here; the message is the skip reason."""


def _first(paths, name):
    for p in paths:
        if shutil.which(p):
            return p
    found = shutil.which(name)
    if found:
        return found
    raise BrowserUnavailable(
        f"{name} is not installed (apt-get install -y chromium chromium-driver; .ci/run does this when it can)")


def open_browser():
    """A selenium Chrome driver on Debian's chromium, with the browser console log enabled."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        raise BrowserUnavailable(f"selenium is not installed (pip install -e '.[test]'): {e}") from e
    binary = _first(CHROMIUM_PATHS, "chromium")
    driver_path = _first(CHROMEDRIVER_PATHS, "chromedriver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-profile-')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        return webdriver.Chrome(service=Service(driver_path), options=options)
    except Exception as e:  # a browser that can't start here is a skip, with its reason
        raise BrowserUnavailable(f"headless chromium did not start: {type(e).__name__}: {e}") from e
