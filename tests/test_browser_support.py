"""The browser tests' rule: without Chromium (or Playwright) they skip on a developer's machine, with the reason,
and fail under CI (CI=true), so a CI run can never pass without checking the web pages."""

from __future__ import annotations

import browser_support
import pytest


def test_a_missing_browser_skips_here_and_fails_in_ci(monkeypatch):
    monkeypatch.setattr(browser_support, "find_chromium", lambda: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="Chromium is not installed.*NOT CHECKED"):
        browser_support.require_browser()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the browser tests"):
        browser_support.require_browser()
