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


def test_the_tab_says_what_its_model_knows_and_shows_an_upload_as_it_sees_it(page):
    open_tab(page, "iGPT")
    # beside the upload, from the loaded model: its size, its 8 greys, its training data
    domain = page.locator("#igpt-domain")
    domain.get_by_text("What this model sees").wait_for()
    text = domain.inner_text()
    assert "28×28 pixels" in text and "8 grey levels" in text and "never sees colour" in text
    assert "Fashion-MNIST only" in text
    assert not page.locator("#igpt-analyse").is_enabled()
    page.locator("#igpt-image input[type=file]").set_input_files("assets/examples/chelsea.jpg")
    seen = page.locator("#igpt-seen img").first
    seen.wait_for(state="visible")
    assert "28×28, 8 greys" in page.locator("#igpt-seen-caption").inner_text()
    page.wait_for_function("() => { const i = document.querySelector('#igpt-seen img');"
                           " return i && i.complete && i.naturalWidth > 0; }")
    # the preview is the photo in the model's 8 greys: every pixel grey, at most 8 levels
    pixels = seen.evaluate("""el => { const c = document.createElement('canvas');
        c.width = el.naturalWidth; c.height = el.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(el, 0, 0);
        return Array.from(g.getImageData(0, 0, c.width, c.height).data); }""")
    rgb = [tuple(pixels[i:i + 3]) for i in range(0, len(pixels), 4)]
    assert all(r == g == b for r, g, b in rgb) and len(set(rgb)) <= 8
    page.locator("#igpt-analyse").click()
    page.locator("#igpt-bits-text").get_by_text("bits per dimension").wait_for()
    assert "never colour" in page.locator("#igpt-rgb9-caption").inner_text()
