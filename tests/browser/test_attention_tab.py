"""The attention tab in real Chromium: analyse an example, click patches, see the query map."""

from __future__ import annotations

from tests.browser.helpers import assert_images_rendered, open_tab, pick_example, plot_in, screenshot

VIEWS = ["attn-heads", "attn-strip", "attn-rollout", "attn-masks", "attn-norms"]


def _src(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} img").first.get_attribute("src") or ""


def test_click_a_patch_changes_the_query_map(page):
    open_tab(page, "Attention maps")
    pick_example(page, "attn", 1)  # chelsea the cat
    page.locator("#attn-run").click()
    page.locator("#attn-summary").get_by_text("heads").wait_for()
    assert "16x16 patches" in page.locator("#attn-summary").inner_text()  # 224 px / 14 px
    assert_images_rendered(page, VIEWS, min_width=100)
    # beside the rollout: the attention sink found in this image's attention
    # (explorer.attention.sinks; on the cat, a patch near the top every token attends to)
    sink = page.locator("#attn-sink-note").inner_text()
    assert "Attention sink:" in sink and "of their attention on the patch at row" in sink
    # the layer slider reads the model's depth: the default DINOv2 ViT-S/14 has 12 blocks
    assert page.locator("#attn-layer input[type=range]").get_attribute("max") == "12"
    assert page.locator("#attn-layer input[type=range]").input_value() == "12"
    plot_in(page, "attn-prefix")
    # the sink view: with the sinks masked, the rollout is redrawn and the sentence under it
    # says where the masked map peaks, against where it peaked as it was
    plain = page.locator("#attn-sink-note").inner_text()
    assert "Shown: sinks as they are." in plain and "Choose masked" in plain
    before = _src(page, "attn-rollout")
    page.locator("#attn-sinks").get_by_text("masked", exact=True).click()
    page.locator("#attn-sink-note").get_by_text("Shown: sinks masked.").wait_for()
    page.wait_for_function(
        "prev => { const i = document.querySelector('#attn-rollout img'); return i && i.src !== prev; }",
        arg=before)
    masked = page.locator("#attn-sink-note").inner_text()
    assert "taken out of every block's attention" in masked and "as they are, it peaks at" in masked

    shown = page.locator("#attn-input img").first
    box = shown.bounding_box()
    shown.click(position={"x": box["width"] * 0.2, "y": box["height"] * 0.2})
    page.locator("#attn-query-info").get_by_text("Query patch").wait_for()
    page.locator("#attn-query img").first.wait_for(state="visible")
    first_info = page.locator("#attn-query-info").inner_text()
    first_src = _src(page, "attn-query")

    shown.click(position={"x": box["width"] * 0.8, "y": box["height"] * 0.7})
    page.wait_for_function(
        "prev => !document.querySelector('#attn-query-info').innerText.includes(prev)",
        arg=first_info.split("(")[0].strip(),
    )
    page.wait_for_function(
        "prev => { const i = document.querySelector('#attn-query img'); return i && i.src !== prev; }",
        arg=first_src,
    )
    assert _src(page, "attn-query") != first_src
    assert "row 11" in page.locator("#attn-query-info").inner_text()  # 0.7 * 16 patches
    page.locator("#attn-query-strip img").first.wait_for(state="visible")
    screenshot(page, "attention")


def test_errors_are_said_in_place_and_leave_the_controls(page, tmp_path):
    open_tab(page, "Attention maps")
    # no image: nothing to run yet
    assert not page.locator("#attn-run").is_enabled()
    # a file that is not an image: its reason beside the results, naming no server path,
    # and no red "Error" over the controls or the views
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"just some text, not pixels")
    page.locator("#attn-image input[type=file]").set_input_files(str(bad))
    page.wait_for_function("() => !document.querySelector('#attn-run').disabled")
    page.locator("#attn-run").click()
    message = page.locator("#attn-message")
    message.get_by_text("not an image").wait_for()
    assert "/tmp" not in message.inner_text() and "gradio" not in message.inner_text()
    for control in ("attn-layer", "attn-start", "attn-query-head", "attn-heads", "attn-rollout"):
        assert "Error" not in page.locator(f"#{control}").inner_text(), control
    assert page.locator("#attn-layer input[type=range]").is_enabled()
    page.wait_for_timeout(1000)  # the message stays (until the next run), no toast
    assert "not an image" in message.inner_text()
    assert page.locator(".toast-body").count() == 0
    # with a real image the same button runs the analysis and the message goes
    pick_example(page, "attn", 0)
    page.locator("#attn-run").click()
    page.locator("#attn-summary").get_by_text("heads").wait_for()
    page.wait_for_function("() => !document.querySelector('#attn-message').innerText.trim()")


def test_a_hub_model_offline_says_so_when_picked(page):
    open_tab(page, "Attention maps")
    dropdown = page.locator("#attn-model")
    dropdown.locator("input").click()
    options = page.locator("#attn-model [role=option]")
    options.filter(has_text="needs internet").first.wait_for()
    labels = [options.nth(i).inner_text() for i in range(options.count())]
    # the five hub models of the catalogue are marked (here: nothing downloaded, no internet)
    assert sum("needs internet" in label for label in labels) == 5, labels
    options.filter(has_text="deit_small_patch16_224.fb_in1k").first.click()
    dropdown.get_by_text("Cannot load here now").wait_for()
    assert "cannot be reached" in dropdown.inner_text()


def test_on_a_phone_the_image_to_click_is_not_covered_by_its_label(browser, app_url):
    """At a phone's width (390 px) the "click a patch" caption sits above the input image,
    which fills most of the width, so a tap lands on the picture."""
    from tests.browser.helpers import SCREENSHOTS
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2)
    page = context.new_page()
    page.set_default_timeout(120_000)
    page.goto(app_url + "?tab=attention&example=chelsea")
    page.locator("#attn-summary").get_by_text("heads").wait_for()
    caption = page.locator("#attn-input-caption")
    caption.scroll_into_view_if_needed()  # images below the fold load lazily
    image = page.locator("#attn-input img").first
    page.wait_for_function("() => document.querySelector('#attn-input img').naturalWidth > 0")
    cap, img = caption.bounding_box(), image.bounding_box()
    assert "click a patch" in caption.inner_text()
    assert cap["y"] + cap["height"] <= img["y"] + 1  # above the picture, not on it
    assert img["width"] >= 200 and img["height"] >= 200
    page.screenshot(path=str(SCREENSHOTS / "attention-phone.png"))
    context.close()
