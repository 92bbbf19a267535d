"""The iGPT tab in real Chromium: pick a Fashion-MNIST example, complete its bottom half."""

from __future__ import annotations

from tests.browser.helpers import open_tab, pick_example, plot_in, screenshot


def test_completion_streams_into_grid(page):
    open_tab(page, "iGPT")
    pick_example(page, "igpt")
    page.locator("#igpt-analyse").click()
    page.locator("#igpt-bits-text").get_by_text("bits per dimension").wait_for()
    page.locator("#igpt-complete").click()
    page.locator("#igpt-status").get_by_text("784/784 pixels").wait_for()
    page.wait_for_function(
        "() => { const el = document.querySelector('#igpt-grid img');"
        " return el && el.complete && el.naturalWidth > 0; }")
    grid = page.locator("#igpt-grid img").first
    # original + 4 completions side by side: far wider than tall
    width, height = grid.evaluate("el => [el.naturalWidth, el.naturalHeight]")
    assert width > 4 * height > 0
    assert "4 completions" in page.locator("#igpt-status").inner_text()
    plot_in(page, "igpt-bits")
    screenshot(page, "igpt")
    # the fast decoder (int8 weights, bf16 cache) completes too, with fewer samples
    page.locator("#igpt-decoder").get_by_text("fast (int8 weights, bf16 cache)").click()
    page.locator("#igpt-n input[type=number]").fill("2")
    page.locator("#igpt-n input[type=number]").press("Enter")
    page.locator("#igpt-complete").click()
    page.locator("#igpt-status").get_by_text("2 completions: 784/784 pixels").wait_for()
