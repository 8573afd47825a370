"""Headless Chromium for the review page's browser tests and its load-time benchmark (Selenium + Debian's
`chromium` and `chromium-driver`; nothing is downloaded). BrowserUnavailable says why it cannot start."""
from __future__ import annotations

import shutil
import tempfile

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]


class BrowserUnavailable(RuntimeError):
    """Selenium, Chromium or chromedriver is missing, or Chromium cannot start here."""


def start_chromium(window: tuple[int, int] = (1600, 1000)):
    """A Selenium driver on a fresh profile (removed by quit_chromium)."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise BrowserUnavailable("selenium is not installed (pip install '.[dev]')") from None
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        raise BrowserUnavailable("Chromium or chromedriver not found (Debian: apt-get install chromium "
                                 "chromium-driver; .ci/run installs them)")
    profile = tempfile.mkdtemp(prefix="review-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in FLAGS + [f"--window-size={window[0]},{window[1]}", f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    try:
        driver = webdriver.Chrome(options=opts, service=Service(driver_path))
    except WebDriverException as exc:
        shutil.rmtree(profile, ignore_errors=True)
        raise BrowserUnavailable(f"Chromium cannot start here: {(exc.msg or str(exc)).splitlines()[0]}") from None
    driver.set_page_load_timeout(60)
    driver.profile_dir = profile
    return driver


def quit_chromium(driver) -> None:
    try:
        driver.quit()
    finally:
        shutil.rmtree(driver.profile_dir, ignore_errors=True)


def wait_for(driver, script: str, timeout: float = 20):
    """Poll a JavaScript expression (`return ...`) until it is truthy; its value."""
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(lambda d: d.execute_script(script))
