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


def pick_example(page, prefix: str, index: int = 0) -> None:
    """Click example ``index`` of the tab whose ids start with ``prefix``; wait for the image."""
    page.locator(f"#{prefix}-examples .gallery-item").nth(index).click()
    page.locator(f"#{prefix}-image img").first.wait_for(state="visible")


def assert_images_rendered(page, elem_ids: list[str], min_width: int) -> None:
    """Each ``gr.Image`` output shows a decoded picture at least ``min_width`` px wide."""
    for elem_id in elem_ids:
        img = page.locator(f"#{elem_id} img").first
        img.wait_for(state="visible")
        assert img.evaluate("el => el.naturalWidth") > min_width, elem_id


def plot_in(page, elem_id: str):
    """The one plotly figure inside ``elem_id``, once drawn (plotly draws after the image outputs)."""
    plot = page.locator(f"#{elem_id} .js-plotly-plot")
    plot.first.wait_for(state="visible")
    assert plot.count() == 1
    return plot.first
