"""The patch-tokenisation tab in real Chromium: pick an example, tokenise, see every view."""

from __future__ import annotations

from tests.browser.helpers import (
    assert_images_rendered,
    open_tab,
    pick_example,
    plot_in,
    screenshot,
    upload_image,
)

VIEWS = ["tokens-grid", "tokens-sequence", "tokens-filters", "tokens-pos-native",
         "tokens-pos-chosen", "tokens-pca"]


def test_example_renders_all_views(page):
    open_tab(page, "Patch tokens")
    # after the example the page opens on has landed (it would replace a pick made before)
    page.locator("#tokens-summary").get_by_text("patch tokens").wait_for()
    pick_example(page, "tokens", 1)  # chelsea the cat
    page.locator("#tokens-width input").fill("336")
    page.locator("#tokens-run").click()
    summary = page.locator("#tokens-summary")
    # 336x224 with 14 px patches: non-square grid (the page opened on the 16x16 example)
    summary.get_by_text("24x16").wait_for()
    assert_images_rendered(page, VIEWS, min_width=50)
    plot_in(page, "tokens-cost")
    assert "75,264" in page.locator("#tokens-cost-table").inner_text()  # 336*224 pixel tokens
    screenshot(page, "tokens")


def test_first_tab_shows_a_worked_example_on_load(page):
    """Opening the app, before any run button is pressed: the first tab (the Lecture) shows
    its first step's live figure, and Patch tokens already holds the first example's views."""
    page.locator("#lecture-heading").get_by_text("Step 1 of").wait_for()
    page.locator("#lecture-image img").first.wait_for(state="visible")
    open_tab(page, "Patch tokens")
    summary = page.locator("#tokens-summary")
    summary.get_by_text("patch tokens").wait_for()
    assert "16x16" in summary.inner_text()  # the default model's 224 px: 16x16 patches
    page.locator("#tokens-image img").first.wait_for(state="visible")
    assert_images_rendered(page, VIEWS, min_width=50)
    plot_in(page, "tokens-cost")


def test_bad_upload_gives_clear_message_and_app_keeps_serving(page, tmp_path):
    open_tab(page, "Patch tokens")
    # the page's first example lands by itself when the page opens (`first_example`); upload
    # after it, or it replaces the upload, as it would for a person who uploads that fast
    page.locator("#tokens-summary").get_by_text("patch tokens").wait_for()
    tiny = tmp_path / "tiny.png"
    from PIL import Image

    Image.new("RGB", (1, 1)).save(tiny)
    # as a person would: run once the upload shows in place of the example the page opened
    # on (a click before it lands sends the example, and no message comes)
    upload_image(page, "tokens-image", tiny)
    page.locator("#tokens-run").click()
    # the reason beside the results, kept until the next run; the outputs are left as they are
    page.locator("#tokens-message").get_by_text("needs at least").wait_for()
    assert "Error" not in page.locator("#tokens-grid").inner_text()
    # the same page still works afterwards, once the example has replaced the tiny image
    pick_example(page, "tokens")
    page.locator("#tokens-run").click()
    page.locator("#tokens-summary").get_by_text("patch tokens").wait_for()
    page.wait_for_function("() => !document.querySelector('#tokens-message').innerText.trim()")
