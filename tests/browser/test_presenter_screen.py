"""Presenter mode on a projector's screen (1280x720) in real Chromium: every lecture step's
heading, words and figure on the first screen, the figure as large as the rest allows, the
title, settings and copy-link folded into one bar and every tab name in view. The
screenshots in docs/screenshots/ (lecture-step1..9.png, app.png) are taken here."""

from __future__ import annotations

import pytest

from explorer import lecture
from explorer.ui import links
from tests.browser.helpers import SCREENSHOTS, text_clashes, words_cut_off

PROJECTOR = {"width": 1280, "height": 720}
STEPS = len(lecture.STEPS)

# The step's figure is drawn and laid out: its file (named after the step) has loaded and
# the page has sized the figure to it (--lecture-ar, `presenter.HEAD`); or its plot is drawn.
READY_JS = """(n) => {
  const img = document.querySelector('#lecture-image img');
  if (img && img.offsetParent !== null) {
    const ar = getComputedStyle(document.documentElement).getPropertyValue('--lecture-ar');
    return img.src.includes(`_step${n}_`) && img.complete && img.naturalWidth > 0 &&
           Math.abs(parseFloat(ar) - img.naturalWidth / img.naturalHeight) < 0.01;
  }
  const plot = document.querySelector('#lecture-plot');
  const label = plot && plot.querySelector('[data-testid="block-label"]');
  return !!(plot && plot.offsetParent !== null && label && label.textContent.includes(`_step${n}_`)
            && plot.querySelector('.js-plotly-plot .main-svg'));
}"""

# Boxes (left, top, right, bottom) of what a step shows, and the drawn size of its figure:
# an <img> is drawn at object-fit: contain inside its box.
LAYOUT_JS = """() => {
  const box = (el) => { const b = el.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; };
  const words = document.getElementById('lecture-words');
  const img = document.querySelector('#lecture-image img');
  let figure, drawn;
  if (img && img.offsetParent !== null) {
    figure = box(img);
    const scale = Math.min(img.clientWidth / img.naturalWidth, img.clientHeight / img.naturalHeight);
    drawn = [img.naturalWidth * scale, img.naturalHeight * scale, img.clientWidth, img.clientHeight];
  } else {
    const svg = document.querySelector('#lecture-plot .js-plotly-plot .main-svg');
    figure = box(svg);
    drawn = [svg.clientWidth, svg.clientHeight, svg.clientWidth, svg.clientHeight];
  }
  return {heading: box(document.querySelector('#lecture-heading h2')),
          text: box(document.getElementById('lecture-text')), figure, drawn,
          words: [words.scrollHeight, words.clientHeight],
          inner: [document.getElementById('lecture-text').scrollHeight,
                  document.getElementById('lecture-text').clientHeight]};
}"""


def inside(box, viewport=PROJECTOR) -> bool:
    left, top, right, bottom = box
    return (left >= 0 and top >= 0 and right <= viewport["width"] + 0.5
            and bottom <= viewport["height"] + 0.5 and right > left and bottom > top)


@pytest.fixture
def projector(browser, app_url):
    context = browser.new_context(viewport=PROJECTOR)
    page = context.new_page()
    page.set_default_timeout(120_000)
    yield page, app_url
    context.close()


def test_every_lecture_step_fits_a_projector_screen(projector):
    page, url = projector
    page.goto(url + "?tab=lecture&example=astronaut&presenter=1")
    page.wait_for_function("() => document.body.classList.contains('presenter')")
    heading = page.locator("#lecture-heading")
    heading.get_by_text(f"Step 1 of {STEPS}").wait_for()
    # one slim bar: no intro, no per-tab link row; the bar's own copy button above the tabs
    assert not page.locator("#app-intro").is_visible()
    assert not page.locator("#lecture-copy-link").is_visible()
    bar = page.locator("#bar-copy-link").bounding_box()
    tabs = page.get_by_role("tab", name=links.LECTURE.title).bounding_box()
    assert bar["y"] + bar["height"] <= tabs["y"] and tabs["y"] < 100
    # every tab's name in view, none behind an overflow menu
    for tab in links.TABS:
        b = page.get_by_role("tab", name=tab.title).bounding_box()
        assert inside((b["x"], b["y"], b["x"] + b["width"], b["y"] + b["height"])), tab.title
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    plotted = []
    for n in range(1, STEPS + 1):
        if n > 1:
            page.locator("#lecture-next").click()
            heading.get_by_text(f"Step {n} of {STEPS}").wait_for()
        page.wait_for_function(READY_JS, arg=n)
        page.wait_for_timeout(300)  # plotly's own resize after the box settles
        got = page.evaluate(LAYOUT_JS)
        for part in ("heading", "text", "figure"):
            assert inside(got[part]), (n, part, got)
        # neither the column nor the step's text inside it (which scrolls on its own) hides
        # words below the fold
        for part in ("words", "inner"):
            scroll, height = got[part]
            assert scroll <= height + 1, (n, "the words need scrolling", part, got)
        # the figure as large as what is left allows: it fills its box in one direction,
        # and spans at least half the screen's width or height
        width, tall, box_w, box_h = got["drawn"]
        assert width >= box_w - 2 or tall >= box_h - 2, (n, got)
        assert width >= 0.5 * PROJECTOR["width"] or tall >= 0.5 * PROJECTOR["height"], (n, got)
        assert got["text"][0] < got["figure"][0]  # the words beside the figure, not under it
        plot = page.locator("#lecture-plot .js-plotly-plot")
        if plot.count() and plot.first.is_visible():  # no word off the figure, no two overlap
            plotted.append(n)
            assert words_cut_off(plot.first) == [], (n, "plot text runs off the figure")
            assert text_clashes(plot.first)["clashes"] == [], (n, text_clashes(plot.first))
        page.screenshot(path=str(SCREENSHOTS / f"lecture-step{n}.png"))
    assert {7, 8, 9} <= set(plotted), plotted  # the lab's steps, at least, were checked


def test_the_normal_view_keeps_its_intro_and_link_rows(browser, app_url):
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    page.set_default_timeout(120_000)
    try:
        page.goto(app_url + "?tab=lecture&example=astronaut&step=3")
        page.locator("#lecture-heading").get_by_text(f"Step 3 of {STEPS}").wait_for()
        page.wait_for_function(READY_JS, arg=3)
        assert page.locator("#app-intro").is_visible()
        assert page.locator("#lecture-copy-link").is_visible()
        assert not page.locator("#bar-copy-link").is_visible()
        for tab in links.TABS:  # wrapped, never hidden: all in view at 1440 px too
            assert page.get_by_role("tab", name=tab.title).is_visible(), tab.title
        page.screenshot(path=str(SCREENSHOTS / "app.png"))
    finally:
        context.close()
