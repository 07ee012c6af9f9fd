"""Debian's Chromium driven by Playwright's Python package, for the tests of the web pages (no tests here).

Playwright's own browser download is never used: the browser is the system's (``make system-deps`` installs
Debian's ``chromium``) and Playwright is pointed at it. Where either is missing the browser tests skip with the
reason on a developer's machine and FAIL in CI (``CI=true``), so CI can never pass without checking the pages.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS_IMG = ROOT / "docs" / "img"
SCREENSHOTS_ENV = "EDGEPEFT_UPDATE_SCREENSHOTS"  # =1: the tests also write docs/img/*.png


def find_chromium() -> str | None:
    return shutil.which("chromium") or next((p for p in ("/usr/bin/chromium", "/usr/lib/chromium/chromium")
                                             if os.access(p, os.X_OK)), None)


def require_browser() -> str:
    """The Chromium executable; skips the calling module (or fails it under CI) when the browser or
    Playwright is missing."""
    reason = None
    exe = find_chromium()
    if exe is None:
        reason = "Chromium is not installed (make system-deps installs it: apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "Playwright's Python package is not installed (pip install -c constraints.txt -e '.[dev]')"
    if reason is None:
        return exe
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"{reason}: CI must run the browser tests", pytrace=False)
    pytest.skip(f"{reason}; THE WEB PAGES ARE NOT CHECKED IN THIS RUN", allow_module_level=True)


@contextmanager
def browser_page(exe: str, width: int = 1000, height: int = 760):
    """A fresh Chromium page (headless; no sandbox when run as root, as in containers). Closed after."""
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=args)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def screenshot(page, out: Path, docs_name: str | None = None) -> Path:
    """Save the page to ``out`` (the test's tmp output) and, with $EDGEPEFT_UPDATE_SCREENSHOTS=1, to docs/img."""
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out), full_page=True)
    if docs_name and os.environ.get(SCREENSHOTS_ENV) == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, DOCS_IMG / docs_name)
    return out


def wait_until(page, expression: str, timeout_s: float = 60.0):
    """Poll a JavaScript expression until it is truthy; returns its value. (Playwright's wait_for_function
    evaluates with eval(), which the pages' Content-Security-Policy rightly refuses.)"""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        value = page.evaluate(expression)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"the page never made {expression!r} true; it shows:\n"
                                 + page.evaluate("document.body.innerText")[:3000])
        page.wait_for_timeout(100)
