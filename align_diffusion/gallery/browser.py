"""Headless Chromium for checking review pages (the tests, `scripts/screenshot_gallery.py`): Debian's `chromium`
and `chromedriver` driven by selenium (`pip install selenium`; `apt-get install chromium chromium-driver`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def headless_chromium(download_dir: str | Path | None = None, width: int = 1280, height: int = 900):
    """A selenium Chrome driver on the system's Chromium, offline flags set; downloads go to `download_dir`.
    The binaries come from $CHROMIUM / $CHROMEDRIVER or the PATH (selenium never downloads a browser here)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser = os.environ.get("CHROMIUM") or shutil.which("chromium")
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    if browser is None or driver is None:
        raise RuntimeError("headless_chromium needs chromium and chromedriver on the PATH (Debian: apt-get install "
                           "chromium chromium-driver), or $CHROMIUM and $CHROMEDRIVER")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    # Without the networking flags Chromium keeps trying to reach Google's hosts, which a closed network refuses.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", f"--window-size={width},{height}"):
        options.add_argument(flag)
    if download_dir is not None:
        options.add_experimental_option("prefs", {"download.default_directory": str(Path(download_dir).resolve()),
                                                  "download.prompt_for_download": False})
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))
