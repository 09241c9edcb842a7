"""Headless Chromium for browser tests (Debian's chromium and chromedriver, which `make test`
installs): a fresh profile per test, no background networking, the console log kept."""

import contextlib
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1600,1000")


@contextlib.contextmanager
def open_page(url: str, profile: Path):
    """A browser showing `url`; its console messages come from `browser.get_log('browser')`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        browser.get(url)
        yield browser
    finally:
        browser.quit()
