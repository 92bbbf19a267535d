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


def test_no_image_says_so_beside_the_upload_and_leaves_the_controls(page):
    open_tab(page, "Attention maps")
    page.locator("#attn-run").click()
    # gradio's validator: the message beside the image input, the analysis never starts
    page.locator("#attn-image").get_by_text("Please upload an image").wait_for()
    for control in ("attn-layer", "attn-start", "attn-query-head"):
        assert "Error" not in page.locator(f"#{control}").inner_text(), control
    assert page.locator("#attn-layer input[type=range]").is_enabled()
    # with an image the same button runs the analysis and the message goes
    pick_example(page, "attn", 0)
    page.locator("#attn-run").click()
    page.locator("#attn-summary").get_by_text("heads").wait_for()
    assert not page.locator("#attn-image").get_by_text("Please upload an image").is_visible()
