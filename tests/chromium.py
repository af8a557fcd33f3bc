"""Debian's headless Chromium driven by Selenium through Debian's chromedriver.

No browser or driver is ever downloaded: both paths are given, so Selenium
Manager is skipped. The flags keep Chromium off the network (the test machines
have none, and without them Chromium stalls on connection attempts) and out
of any shared profile.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

CHROMIUM = os.environ.get("GATE_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("GATE_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--disable-extensions",
    "--disable-default-apps",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
)


def missing() -> str | None:
    """Why Chromium cannot run here (scripts/system-deps.sh installs both), or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{path} is missing (scripts/system-deps.sh installs chromium, chromium-driver)"
    return None


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A headless Chromium WebDriver with a fresh profile, quit and cleaned up afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="gate-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(20)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def full_page_screenshot(driver: Any, path: str, width: int) -> None:
    """Size the viewport to ``width`` by the page's full height and save a PNG of it."""
    # set_window_size sets the outer size: add what the window takes around the viewport.
    outer = driver.get_window_size()
    inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    extra_w, extra_h = outer["width"] - inner[0], outer["height"] - inner[1]
    driver.set_window_size(width + extra_w, 600 + extra_h)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width + extra_w, int(height) + extra_h)
    driver.save_screenshot(path)
