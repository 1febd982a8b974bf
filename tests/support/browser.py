"""Headless Chromium for the viewer's tests: Debian's chromium driven by selenium through Debian's chromedriver
(same version), with nothing downloaded and no network traffic of its own. The performance log records every
request the page makes, so a test can check that all of them stayed on disk."""

from __future__ import annotations

import contextlib
import json
import os
import shutil

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)


def missing() -> str | None:
    """Why no browser test can run here (None: it can)."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.access(path, os.X_OK) or shutil.which(os.path.basename(path))):
            return f"{path} is not installed (bash scripts/setup.sh installs Debian's chromium and chromium-driver)"
    return None


@contextlib.contextmanager
def headless_chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    os.environ.setdefault("SE_AVOID_STATS", "true")  # selenium's own telemetry, should it ever run its manager
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        browser = driver.capabilities["browserVersion"]
        chromedriver = driver.capabilities["chrome"]["chromedriverVersion"]
        assert browser.split(".")[0] == chromedriver.split(".")[0], f"chromium {browser}, chromedriver {chromedriver}"
        yield driver
    finally:
        driver.quit()


def requested_urls(driver) -> list[str]:
    """Every URL the page asked for since the last call (from Chromium's performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls
