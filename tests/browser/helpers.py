"""Helpers for browser tests (import: `from tests.browser.helpers import open_tab, screenshot`)."""

from __future__ import annotations

from pathlib import Path

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


def open_tab(page, name: str) -> None:
    """Click the top-level tab called ``name``."""
    page.get_by_role("tab", name=name).click()


def screenshot(page, name: str) -> Path:
    """Save a full-page screenshot for the README under docs/screenshots/."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
