"""The "Inductive bias & scale" tab in real Chromium: the shipped grid on the page, a link
that opens the relative-attention views, a tiny live point landing on the plot."""

from __future__ import annotations

import re

import pytest

from explorer import datasets
from explorer.ui import lab_view
from tests.browser.helpers import open_tab, plot_in, screenshot, scrolled_rows


def test_the_lab_says_how_far_the_grid_is_and_shows_the_scrambled_experiment(page, app_url):
    from explorer.lab import grid
    status = grid.status()  # what is on disk now (the app read the same at start)
    page.goto(app_url + "?tab=lab")
    page.get_by_role("tab", name="Inductive bias & scale").wait_for()
    progress = page.locator("#lab-progress")
    progress.wait_for()
    total = len(status["done"]) + len(status["training"]) + len(status["todo"])
    text = progress.inner_text()
    if status["training"] or status["todo"]:
        # a run may finish between the app's start and now: at most what is done now
        done, shown_total = map(int, re.search(r"(\d+) of (\d+) runs finished", text).groups())
        assert shown_total == total and done <= len(status["done"])
    else:
        assert f"All {total} grid runs have finished" in text
    scrambled = plot_in(page, "lab-scrambled-plot")
    assert "Scrambled Fashion-MNIST" in scrambled.locator(".gtitle").text_content()
    assert "Inductive bias is an assumption" in page.locator("#lab-scrambled").inner_text()
    # what training again bought, beside the convergence check, as the rows say
    longer = lab_view.longer_text(lab_view.grid_rows(), lab_view.attempt_rows())
    checks = page.locator("#lab-convergence").inner_text()
    assert "Convergence check" in checks
    assert ("Trained again by the rule" in checks) == bool(longer)
    if longer:  # each retrained run's attempts: folded until the reader opens them
        first = next(line[2:] for line in longer.splitlines() if line.startswith("- "))
        item = page.locator("#lab-convergence li").first
        assert not item.is_visible()
        page.locator("#lab-convergence summary").click()
        assert item.inner_text() == first
        page.locator("#lab-convergence summary").click()  # folded again for the screenshot
        assert not item.is_visible()
    screenshot(page, "lab")  # the tab as shipped now (the next test retakes it with models)


def test_every_run_is_listed_and_its_curve_shows_the_rules_verdict(page, app_url):
    rows, attempts = lab_view.grid_rows(), lab_view.attempt_rows()
    if not rows and not attempts:
        pytest.skip("no grid run has finished")
    runs = {lab_view.run_name(r): r for r in attempts + rows}
    page.goto(app_url + "?tab=lab")
    page.get_by_text("Every run: its numbers and validation curve").click()
    table = page.locator("#lab-runs-table")
    lines = lab_view.runs_table(rows, attempts)
    table.get_by_text(lines[0][0], exact=True).first.wait_for()
    shown = scrolled_rows(table, ".virtual-table-viewport")
    # every run and retrained attempt has its line, scrolled to as a reader would, in the
    # table's order, with the rule's verdict
    assert [r[0] for r in shown] == [line[0] for line in lines]
    assert [r[-1] for r in shown] == [line[-1] for line in lines]
    curve = plot_in(page, "lab-run-curve")
    first = runs[lines[0][0]]  # the picker starts where the table does
    title = curve.locator(".gtitle").text_content()
    gain = 100 * lab_view.analysis.convergence(first).late_gain
    assert f"{first['train_images']:,} images" in title and f"late gain {gain:+.2f}" in title
    if len(runs) > 1:  # picking another run redraws its curve
        other = lines[-1][0]
        page.locator("#lab-run-pick input").fill(other)
        page.keyboard.press("Enter")
        steps = f"{runs[other]['steps']:,} steps"
        curve.locator(".gtitle", has_text=steps).wait_for()
    screenshot(page, "lab-runs")


def test_link_opens_the_lab_with_the_grid_and_the_relative_views(page, app_url):
    if not lab_view.shipped_sizes():
        pytest.skip("no shipped lab models")
    page.goto(app_url + "?tab=lab")
    page.wait_for_selector(".gradio-container")
    tab = page.get_by_role("tab", name="Inductive bias & scale")
    page.wait_for_function("t => t.getAttribute('aria-selected') === 'true'",
                           arg=tab.element_handle())
    rows = lab_view.grid_rows()
    data = plot_in(page, "lab-data-plot")
    finished = {r["arch"] for r in rows if lab_view.analysis.is_main(r)}
    for arch in finished:  # the grid lands in stages: the architectures with a finished run
        name = lab_view.ARCH_LABELS[arch]
        assert data.locator(".legendtext", has_text=name).count() == 1, name
    assert "test error" in data.locator(".ytitle").text_content()
    compute = plot_in(page, "lab-compute-plot")
    widths = {c.width for c in lab_view.analysis.compute_curves(rows)}
    if widths:
        compute.locator(".legendtext", has_text=f"w{max(widths)} (").first.wait_for()
    else:
        compute.get_by_text("The ViT size sweep is still training").wait_for()
    # the link ran the relative views by itself
    shift = plot_in(page, "lab-shift-plot")
    shift.locator(".gtitle", has_text="Translation test").wait_for()
    bias = plot_in(page, "lab-bias-plot")
    # heads named once above the columns, blocks left of the rows
    assert [a.text_content() for a in bias.locator(".annotation-text").all()] == [
        f"head {j}" for j in range(1, 5)]
    assert bias.locator(".ytitle", has_text="block 1").count() == 1
    screenshot(page, "lab")


@pytest.mark.skipif(not datasets.FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist")
def test_a_tiny_live_point_lands_on_the_plot_and_in_the_pickers(page):
    open_tab(page, "Inductive bias & scale")
    page.locator("#lab-train").click()
    page.locator("#lab-status").get_by_text("test accuracy").wait_for(timeout=180_000)
    status = page.locator("#lab-status").inner_text()
    name = re.search(r"fine-tuned: lab-vit-w64-d4-n500-s0-[0-9a-f]+", status).group(0)
    data = plot_in(page, "lab-data-plot")
    data.locator(".legendtext", has_text="your run").wait_for()
    live = plot_in(page, "lab-live-plot")
    assert live.locator(".legendtext", has_text="training loss").count() == 1
    # the from-scratch ViT is now in this session's attention picker
    open_tab(page, "Attention maps")
    picker = page.get_by_label("Model").filter(visible=True).first
    picker.click()
    page.get_by_role("option", name=name).wait_for()
