"""Links, the lecture path and presenter mode in real Chromium."""

from __future__ import annotations

from tests.browser.helpers import (
    label_collisions,
    plot_in,
    screenshot,
    text_clashes,
    words_cut_off,
)


def _open(page, url):
    page.goto(url)
    page.wait_for_selector(".gradio-container")


def test_link_opens_attention_on_the_example_at_the_layer(fresh):
    page, url = fresh
    _open(page, url + "?tab=attention&example=chelsea&layer=6&head=2")
    # the analysis ran by itself on the linked example, at the linked layer
    page.locator("#attn-summary").get_by_text("heads").wait_for()
    assert page.get_by_role("tab", name="Attention maps").get_attribute("aria-selected") == "true"
    assert "chelsea" in page.locator("#attn-image img").first.get_attribute("src")
    assert page.locator("#attn-layer input[type=range]").input_value() == "6"
    page.locator("#attn-heads img").first.wait_for(state="visible")
    assert page.locator("#attn-query-head input").input_value() == "head 2"
    assert not page.locator("#link-note").is_visible()
    # the tab's copy control gives back a link to the same view
    page.locator("#attention-copy-link").click()
    page.wait_for_function(
        "() => document.querySelector('#attention-link textarea, #attention-link input')"
        ".value.includes('layer=6')")
    link = page.locator("#attention-link textarea, #attention-link input").first.input_value()
    assert link.startswith("http") and "tab=attention" in link and "example=chelsea" in link
    assert "head=2" in link


def test_bad_parameters_give_a_note_not_an_error(fresh):
    page, url = fresh
    _open(page, url + "?tab=attention&example=dog&layer=99&head=zz")
    note = page.locator("#link-note")
    note.get_by_text("Unknown example").wait_for()
    text = note.inner_text()
    assert "Layer 99 does not exist" in text and "Head 'zz'" in text
    page.locator("#attn-summary").get_by_text("heads").wait_for()  # defaults still ran
    assert page.locator("#attn-layer input[type=range]").input_value() == "12"
    _open(page, url + "?tab=nosuchtab&step=77")
    page.locator("#link-note").get_by_text("Unknown tab 'nosuchtab'").wait_for()
    page.locator("#lecture-heading").get_by_text("Step 1").wait_for()


def test_lecture_steps_by_keyboard_and_survives_a_reload(fresh):
    page, url = fresh
    _open(page, url + "?tab=lecture&example=coffee")
    heading = page.locator("#lecture-heading")
    heading.get_by_text("Step 1 of 9").wait_for()
    page.locator("#lecture-image img").first.wait_for(state="visible")
    page.locator("body").click(position={"x": 5, "y": 5})
    page.keyboard.press("ArrowRight")
    heading.get_by_text("Step 2 of 9").wait_for()
    page.keyboard.press("ArrowRight")
    heading.get_by_text("Step 3 of 9").wait_for()
    page.keyboard.press("ArrowLeft")
    heading.get_by_text("Step 2 of 9").wait_for()
    page.wait_for_function("() => location.search.includes('step=2')")
    assert "example=coffee" in page.url
    page.reload()
    page.locator("#lecture-heading").get_by_text("Step 2 of 9").wait_for()
    # the step's link opens the full tab prepared the same way
    href = page.locator("#lecture-link a").first.get_attribute("href")
    assert "tab=igpt" in href and "example=coffee" in href


def test_presenter_text_and_figure_labels_are_large(fresh):
    page, url = fresh
    _open(page, url + "?tab=lecture&step=7&presenter=1")
    page.locator("#lecture-heading").get_by_text("Step 7 of 9").wait_for()
    plot = plot_in(page, "lecture-plot")
    page.wait_for_function("() => document.body.classList.contains('presenter')")
    body = page.locator("#lecture-text p").first
    assert float(body.evaluate("e => parseFloat(getComputedStyle(e).fontSize)")) >= 18
    sizes = plot.evaluate(
        "p => [...p.querySelectorAll('text')].filter(t => t.textContent.trim())"
        ".map(t => parseFloat(getComputedStyle(t).fontSize))")
    assert sizes and min(sizes) >= 18, sizes
    assert "trained here" in plot.inner_text().lower()  # the lab's grid, labelled as measured


def test_presenting_lays_the_lab_tabs_figures_out_for_the_projector(fresh):
    """Not only the CSS's larger text (which plotly would place for its own small fonts, so
    labels overlap): the figures are redrawn with the projector's fonts, as the Lecture's."""
    from explorer.plots.lecture import PRESENTER_FONT
    page, url = fresh
    _open(page, url + "?tab=lab&presenter=1")
    page.wait_for_function("() => document.body.classList.contains('presenter')")
    ids = ("lab-data-plot", "lab-scrambled-plot", "lab-paper-plot", "lab-compute-plot",
           "lab-paper-scaling-plot")
    font = "id => document.querySelector(`#${id} .js-plotly-plot`)._fullLayout.font.size"
    for elem_id in ids:
        plot_in(page, elem_id)
        page.wait_for_function(f"id => ({font})(id) === {PRESENTER_FONT}", arg=elem_id)
    # no figure's words run into each other at the projector's fonts (the relative-bias
    # grid's 16 subplot titles and the translation test's two side-by-side panels did), the
    # relative views included, drawn for the projector when the link opens the tab
    from explorer.ui import lab_view
    relative = ("lab-bias-plot", "lab-shift-plot") if lab_view.shipped_sizes() else ()
    for elem_id in relative:  # (drawn once, for the switch as it was: not redrawn by it)
        plot_in(page, elem_id).locator(".gtitle").wait_for()
        page.wait_for_function(f"id => ({font})(id) === {PRESENTER_FONT}", arg=elem_id)
    for elem_id in ids + relative:
        words = text_clashes(plot_in(page, elem_id))
        assert words["texts"] >= 2 and words["clashes"] == [], (elem_id, words)
    screenshot(page, "lab-presenter")
    # the paper's scatter keeps its five labels apart at the projector's fonts (they collided)
    paper = plot_in(page, "lab-paper-scaling-plot")
    assert label_collisions(paper) == {"labels": 5, "clashes": [], "outside": []}
    # and drawn at the page's own sizes again when the switch is turned off
    page.locator("#presenter input").uncheck()
    for elem_id in ids:
        page.wait_for_function(f"id => ({font})(id) < {PRESENTER_FONT}", arg=elem_id)
    assert label_collisions(paper) == {"labels": 5, "clashes": [], "outside": []}


def test_presenting_refits_the_other_tabs_figures_for_the_projector(fresh):
    """A figure the server drew at the page's fonts (here the distance tab's) is laid out
    again at the projector's when presenting: before, the CSS enlarged its text where plotly
    had placed it small, and its legend entries ran into each other and the axis title."""
    from explorer.plots.lecture import PRESENTER_FONT
    page, url = fresh
    _open(page, url + "?tab=distance&presenter=1")
    plot = plot_in(page, "dist-plot")
    font = "() => document.querySelector('#dist-plot .js-plotly-plot')._fullLayout.font.size"
    page.wait_for_function(f"() => ({font})() === {PRESENTER_FONT}", timeout=30_000)
    words = text_clashes(plot)
    assert words["texts"] >= 6 and words["clashes"] == [], words
    legend = plot.evaluate("g => [g._fullLayout.legend.yref, g._fullLayout.legend.y]")
    assert legend == ["container", 0]  # at the figure's foot, room made for it
    page.locator("#presenter input").uncheck()  # the figure's own layout back
    page.wait_for_function(f"() => ({font})() < {PRESENTER_FONT}", timeout=30_000)
    assert plot.evaluate("g => [g._fullLayout.legend.yref, g._fullLayout.legend.y]") == [
        "paper", -0.2]


_LINES = "(p, sel) => p.querySelectorAll(`${sel} tspan.line`).length"


def test_presenting_breaks_long_titles_over_lines_and_keeps_the_data_s_height(fresh):
    """At the projector's fonts a title or axis title longer than its room ran off the
    figure (the attention tab's y-axis title, the tokens tab's cost title), and the larger
    margins squeezed a figure of a set height: the words now break over lines, the figure
    grows by what its text took, and both come back as they were when presenting stops."""
    from explorer.plots.lecture import PRESENTER_FONT
    page, url = fresh
    _open(page, url + "?tab=attention&example=astronaut")
    prefix = plot_in(page, "attn-prefix")
    own = prefix.evaluate("p => [p._fullLayout.height, p._fullLayout._size.h]")
    page.locator("#presenter input").check()
    page.wait_for_function(f"p => p._fullLayout.font.size === {PRESENTER_FONT}"
                           f" && ({_LINES})(p, '.ytitle') > 1", arg=prefix.element_handle(),
                           timeout=30_000)
    assert words_cut_off(prefix) == [] and text_clashes(prefix)["clashes"] == []
    norms = plot_in(page, "attn-norm-hist")  # the tab's other figure, refitted too
    page.wait_for_function(f"p => p._fullLayout.font.size === {PRESENTER_FONT}",
                           arg=norms.element_handle(), timeout=30_000)
    assert words_cut_off(norms) == [] and text_clashes(norms)["clashes"] == []
    assert prefix.evaluate("p => p._fullLayout._size.h") >= own[1] - 1  # the data's height kept
    # and the grown figure is not cut by its block
    assert prefix.evaluate("p => p.closest('.block').getBoundingClientRect().bottom"
                           " - p.querySelector('.main-svg').getBoundingClientRect().bottom") >= 0
    page.locator("#presenter input").uncheck()
    page.wait_for_function("() => document.querySelector('#attn-prefix .js-plotly-plot')"
                           f"._fullLayout.font.size < {PRESENTER_FONT}")
    assert prefix.evaluate(f"p => [p._fullLayout.height, ({_LINES})(p, '.ytitle')]") == [own[0], 0]
    assert "mean over heads" in prefix.locator(".ytitle").text_content()
    # the tokens tab's cost: a two-line title, and the tallest bar's number whole, at the
    # projector's size, above its bar
    _open(page, url + "?tab=tokens&example=astronaut&presenter=1")
    cost = plot_in(page, "tokens-cost")
    page.wait_for_function(f"p => ({_LINES})(p, '.gtitle') > 1", arg=cost.element_handle(),
                           timeout=30_000)
    assert words_cut_off(cost) == [] and text_clashes(cost)["clashes"] == []
    top = cost.locator(".bartext", has_text="2,517,630,976")
    assert float(top.evaluate("t => getComputedStyle(t).fontSize")[:-2]) >= 18


def test_figures_download_with_names_that_say_what_they_show(fresh):
    page, url = fresh
    _open(page, url + "?tab=lecture&example=rocket&step=3")
    page.locator("#lecture-heading").get_by_text("Step 3 of 9").wait_for()
    page.locator("#lecture-image img").first.wait_for(state="visible")
    page.locator("#lecture-image").hover()
    with page.expect_download() as got:
        page.locator("#lecture-image a[download]").first.click()
    assert got.value.suggested_filename == "vit-explorer_rocket_step3_patch-grid.png"
    # plots: plotly's download button, named after the figure; PNG or SVG
    for step in (4, 5, 6):  # a press while a step is drawing is ignored: wait for each
        page.locator("#lecture-next").click()
        page.locator("#lecture-heading").get_by_text(f"Step {step} of 9").wait_for()
    plot = plot_in(page, "lecture-plot")
    page.locator("#plot-format").get_by_text("svg").click()
    page.wait_for_function(
        "() => (document.querySelector('#lecture-plot .js-plotly-plot')._context"
        ".toImageButtonOptions || {}).format === 'svg'")
    options = plot.evaluate("p => p._context.toImageButtonOptions")
    assert options["filename"].startswith("vit-explorer_rocket_")
    assert "mean-attention-distance" in options["filename"]
    # and a real click on plotly's camera button saves that SVG under that name
    plot.hover()
    with page.expect_download() as got:
        page.locator("#lecture-plot .modebar-btn[data-title^='Download plot']").first.click()
    assert got.value.suggested_filename == options["filename"] + ".svg"
    with open(got.value.path(), encoding="utf-8") as f:
        assert f.read(200).lstrip().startswith("<svg")


def test_a_link_to_the_first_tab_keeps_its_example(fresh):
    """The tokens tab's worked example (loaded on open) must not replace a linked one."""
    page, url = fresh
    _open(page, url + "?tab=tokens&example=chelsea")
    page.locator("#tokens-summary").get_by_text("patch tokens").wait_for()
    page.wait_for_timeout(1500)  # any late load would have landed by now
    assert "chelsea" in page.locator("#tokens-image img").first.get_attribute("src")
    assert page.get_by_role("tab", name="Patch tokens").get_attribute("aria-selected") == "true"
