"""The mean-attention-distance tab in real Chromium: the Fig. 7-style plot and dataset band."""

from __future__ import annotations

from tests.browser.helpers import open_tab, pick_example, plot_in, screenshot

TRACE_NAMES = "el => el.data.map(t => t.name)"


def test_distance_plot_renders_with_band_and_cnn(page):
    open_tab(page, "Mean attention distance")
    pick_example(page, "dist")
    page.locator("#dist-run").click()
    page.locator("#dist-info").get_by_text("images/s").wait_for()
    plot = plot_in(page, "dist-plot")
    names = plot.evaluate(TRACE_NAMES)
    assert "dinov2_vits14 (offline)" in names
    assert "random init (same architecture)" in names
    assert any("MobileNetV2" in n for n in names)
    assert page.locator("#dist-plot .scatterlayer .point").count() >= 2 * 12 * 6  # two ViTs
    # under the plot, its profile in words (explorer.lecture.distance_note; the numbers are
    # checked against the plotted dots in tests/test_lecture_figures.py)
    info = page.locator("#dist-info").inner_text()
    assert "most global head is head" in info and "uniform attention over the whole image" in info
    page.locator("#dist-erf img").first.wait_for(state="visible")

    page.locator("#dist-band-n input[type=number]").fill("8")
    page.locator("#dist-band-n input[type=number]").press("Enter")
    page.locator("#dist-band-run").click()
    page.locator("#dist-band-info").get_by_text("images/s").wait_for()
    page.wait_for_function(
        "() => document.querySelector('#dist-plot .js-plotly-plot').data"
        ".some(t => t.name.includes('Fashion-MNIST'))"
    )
    screenshot(page, "distance")


def test_no_image_no_run(page):
    open_tab(page, "Mean attention distance")
    assert page.locator("#dist-image img").count() == 0  # a fresh page: no image yet
    assert not page.locator("#dist-run").is_enabled()
    pick_example(page, "dist")
    page.wait_for_function("() => !document.querySelector('#dist-run').disabled")
