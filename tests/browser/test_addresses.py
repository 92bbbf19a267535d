"""The address bar names what is on the screen (tab, example, size, view settings; the
lecture's step), a reload comes back to it, and lecture steps never lose a click."""

from __future__ import annotations

from urllib.parse import parse_qsl


def address(page) -> dict:
    return dict(parse_qsl(page.evaluate("location.search").lstrip("?")))


def wait_address(page, **expected) -> None:
    """Wait until the address holds ``expected`` (parameter: value)."""
    page.wait_for_function(
        "(want) => { const q = new URL(location.href).searchParams;"
        " return Object.entries(want).every(([k, v]) => q.get(k) === v); }", arg=expected)


def test_a_deep_link_keeps_its_address_and_survives_a_reload(fresh):
    page, url = fresh
    link = "?tab=attention&example=chelsea&size=448&layer=6&head=3"
    page.goto(url + link)
    page.locator("#attn-summary").get_by_text("heads").wait_for()
    page.wait_for_timeout(3000)  # everything the page load fires has landed
    want = {"tab": "attention", "example": "chelsea", "size": "448", "layer": "6", "head": "3"}
    assert address(page) == want  # not rewritten to the lecture
    page.reload()
    page.locator("#attn-summary").get_by_text("heads").wait_for()
    assert page.get_by_role("tab", name="Attention maps").get_attribute("aria-selected") == "true"
    assert "chelsea" in page.locator("#attn-image img").first.get_attribute("src")
    assert page.locator("#attn-layer input[type=range]").input_value() == "6"
    assert page.locator("#attn-query-head input").input_value() == "head 3"
    assert page.locator("#attn-width input").input_value() == "448"
    page.wait_for_timeout(2000)
    assert address(page) == want
    # a linked control moved: the address follows, without a reload
    page.evaluate("() => { window.__notReloaded = true; }")
    slider = page.locator("#attn-layer input[type=range]")
    slider.focus()
    page.keyboard.press("ArrowLeft")
    wait_address(page, tab="attention", layer="5", example="chelsea")
    assert page.evaluate("() => window.__notReloaded === true")
    # switching tabs names the new tab (and what it shows), and back again
    page.get_by_role("tab", name="Patch tokens").click()
    wait_address(page, tab="tokens")
    assert "layer" not in address(page)
    page.get_by_role("tab", name="Attention maps").click()
    wait_address(page, tab="attention", layer="5", head="3")
    # the sink view travels too, and a reload brings it back
    page.locator("#attn-sinks").get_by_label("masked").check()
    wait_address(page, tab="attention", layer="5", sinks="masked")
    page.reload()
    page.locator("#attn-summary").get_by_text("heads").wait_for()
    assert page.locator("#attn-sinks").get_by_label("masked").is_checked()
    assert page.locator("#attn-layer input[type=range]").input_value() == "5"
    page.evaluate("() => { window.__notReloaded = true; }")
    page.get_by_role("tab", name="Lecture").click()
    wait_address(page, tab="lecture", step="1")
    assert page.evaluate("() => window.__notReloaded === true")


def test_quick_clicks_on_next_and_arrow_keys_all_count(fresh):
    page, url = fresh
    page.goto(url + "?tab=lecture&example=coffee&step=4")
    heading = page.locator("#lecture-heading")
    heading.get_by_text("Step 4 of 9").wait_for()
    for _ in range(3):  # no wait between clicks: each one counts
        page.locator("#lecture-next").click()
    heading.get_by_text("Step 7 of 9").wait_for()
    wait_address(page, tab="lecture", step="7", example="coffee")
    page.wait_for_timeout(2000)  # and nothing draws another step afterwards
    assert "Step 7 of 9" in heading.inner_text()
    assert page.locator("#lecture-step input").input_value() == "7"
    page.locator("body").click(position={"x": 5, "y": 400})
    for _ in range(4):
        page.keyboard.press("ArrowLeft")
    heading.get_by_text("Step 3 of 9").wait_for()
    for _ in range(3):  # the path ends at its first step: extra presses do nothing
        page.locator("#lecture-prev").click()
    heading.get_by_text("Step 1 of 9").wait_for()
    wait_address(page, step="1")
    page.wait_for_timeout(1500)
    assert "Step 1 of 9" in heading.inner_text()
