"""Helpers for browser tests (import: `from tests.browser.helpers import open_tab, screenshot`)."""

from __future__ import annotations

from pathlib import Path

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


def open_tab(page, name: str) -> None:
    """Click the top-level tab called ``name``."""
    page.get_by_role("tab", name=name).click()


def screenshot(page, name: str) -> Path:
    """Save a full-page screenshot for the README under docs/screenshots/.

    Gradio's image preview marks its <img> ``loading="lazy"`` (ImagePreview in gradio 6.31's
    bundle), so pictures far below the viewport may not have loaded when the page is captured
    whole: make them eager and wait until every picture on the page has loaded."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.evaluate("() => document.querySelectorAll('img[loading=lazy]')"
                  ".forEach(i => { i.loading = 'eager'; })")
    page.wait_for_function("() => [...document.images].every(i => i.complete)")
    page.screenshot(path=str(path), full_page=True)
    return path


def _shown(page, elem_id: str) -> str | None:
    """The source of the picture the ``gr.Image`` ``elem_id`` shows, if any."""
    img = page.locator(f"#{elem_id} img")
    return img.first.evaluate("i => i.src") if img.count() else None  # absolute, as below


def _wait_for_new_picture(page, elem_id: str, before: str | None) -> None:
    """Wait until ``elem_id`` shows a decoded picture whose source is not ``before``.

    Waiting for any visible img is not enough where the component already shows a picture
    (the example the page opened on): a click on run then could send the old image."""
    page.wait_for_function(
        "([sel, src]) => { const i = document.querySelector(sel);"
        " return i && i.src && i.src !== src && i.complete && i.naturalWidth > 0; }",
        arg=[f"#{elem_id} img", before])


def pick_example(page, prefix: str, index: int = 0) -> None:
    """Click example ``index`` of the tab whose ids start with ``prefix``; return once its
    picture has replaced what the image showed (so it must not be the one shown already)."""
    before = _shown(page, f"{prefix}-image")
    page.locator(f"#{prefix}-examples .gallery-item").nth(index).click()
    _wait_for_new_picture(page, f"{prefix}-image", before)


def upload_image(page, elem_id: str, path) -> None:
    """Upload ``path`` into the ``gr.Image`` ``elem_id``; return once the upload shows."""
    before = _shown(page, elem_id)
    page.locator(f"#{elem_id} input[type=file]").set_input_files(str(path))
    _wait_for_new_picture(page, elem_id, before)


def assert_images_rendered(page, elem_ids: list[str], min_width: int) -> None:
    """Each ``gr.Image`` output shows a decoded picture at least ``min_width`` px wide."""
    for elem_id in elem_ids:
        img = page.locator(f"#{elem_id} img").first
        img.wait_for(state="visible")
        assert img.evaluate("el => el.naturalWidth") > min_width, elem_id


def plot_in(page, elem_id: str):
    """The one plotly figure inside ``elem_id``, once drawn (plotly draws after the image outputs)."""
    plot = page.locator(f"#{elem_id} .js-plotly-plot")
    plot.first.wait_for(state="visible")
    assert plot.count() == 1
    return plot.first


# Every drawn point label, marker and the legend of a plotly figure, as boxes on the page; the pairs that
# overlap and the labels that leave the plot area (plotly clips those)
_LABEL_BOXES = """p => {
  const box = e => { const r = e.getBoundingClientRect();
                     return {l: r.left, r: r.right, t: r.top, b: r.bottom}; };
  const labels = [...p.querySelectorAll('.scatterlayer .textpoint text')]
    .filter(t => t.textContent.trim()).map(t => [t.textContent, box(t)]);
  const markers = [...p.querySelectorAll('.scatterlayer path.point')]
    .map((m, i) => ['marker ' + i, box(m)]);
  const area = box(p.querySelector('.nsewdrag'));
  const hit = (a, b) => Math.min(a.r, b.r) > Math.max(a.l, b.l) + 0.5
                        && Math.min(a.b, b.b) > Math.max(a.t, b.t) + 0.5;
  const legend = p.querySelector('.legend');
  const all = labels.concat(markers, legend ? [['legend', box(legend)]] : []), clashes = [];
  for (let i = 0; i < labels.length; i++)
    for (let j = i + 1; j < all.length; j++)
      if (hit(all[i][1], all[j][1])) clashes.push([all[i][0], all[j][0]]);
  const outside = labels.filter(([, b]) => b.l < area.l || b.r > area.r || b.t < area.t
                                            || b.b > area.b).map(([t]) => t);
  return {labels: labels.length, clashes, outside};
}"""


def label_collisions(plot) -> dict:
    """The point labels of ``plot`` (a `plot_in` locator): how many, which pairs of labels, or
    of a label and a marker or the legend, overlap, which labels leave the plot area."""
    return plot.evaluate(_LABEL_BOXES)


def scrolled_rows(locator, scroller: str) -> list[list[str]]:
    """The rows (cells' text) of the table in ``locator`` as a reader scrolling its
    ``scroller`` element from top to bottom sees them, each once: a long table (Gradio's
    Dataframe) draws only the rows in view."""
    return locator.evaluate("""async (e, sel) => {
      const box = e.querySelector(sel), seen = new Map();
      for (let top = 0; ; top += box.clientHeight / 2) {
        box.scrollTop = top;
        await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
        for (const row of box.querySelectorAll('[role=row][data-index]')) {
          const cells = [...row.querySelectorAll('[role=gridcell]')].map(c => c.innerText.trim());
          if (cells.length && cells[0]) seen.set(cells.join('\\t'), cells);
        }
        if (box.scrollTop + box.clientHeight >= box.scrollHeight - 1 || top > box.scrollHeight)
          break;
      }
      box.scrollTop = 0;
      return [...seen.values()];
    }""", scroller)


# Every title, axis title, annotation (subplot titles) and legend entry of a plotly figure,
# as boxes on the page, and the pairs that overlap (tick labels are plotly's own to place)
_TEXT_BOXES = """p => {
  const sel = '.gtitle, .annotation-text, .legendtext, [class$="title"]:not(.gtitle)';
  const texts = [...p.querySelectorAll(sel)].filter(t => t.textContent.trim() && t.tagName === 'text')
    .map(t => { const r = t.getBoundingClientRect();
                return [t.textContent, {l: r.left, r: r.right, t: r.top, b: r.bottom}]; });
  const hit = (a, b) => Math.min(a.r, b.r) > Math.max(a.l, b.l) + 0.5
                        && Math.min(a.b, b.b) > Math.max(a.t, b.t) + 0.5;
  const clashes = [];
  for (let i = 0; i < texts.length; i++)
    for (let j = i + 1; j < texts.length; j++)
      if (hit(texts[i][1], texts[j][1])) clashes.push([texts[i][0], texts[j][0]]);
  return {texts: texts.length, clashes};
}"""


def text_clashes(plot) -> dict:
    """The words of ``plot`` (a `plot_in` locator) outside its data: how many titles, axis
    titles, subplot titles and legend entries it draws, and which pairs of them overlap."""
    return plot.evaluate(_TEXT_BOXES)


# The words of a plotly figure cut off by its edges (the svg it draws in)
_CUT = """p => { const edge = p.querySelector('.main-svg').getBoundingClientRect();
  return [...p.querySelectorAll('text')].filter(t => t.textContent.trim())
    .map(t => [t.textContent, t.getBoundingClientRect()])
    .filter(([, b]) => b.width && (b.left < edge.left - 1 || b.right > edge.right + 1
                                   || b.top < edge.top - 1 || b.bottom > edge.bottom + 1))
    .map(([text]) => text); }"""


def words_cut_off(plot) -> list[str]:
    """The words of ``plot`` (a `plot_in` locator) that run past the edges of its figure."""
    return plot.evaluate(_CUT)
