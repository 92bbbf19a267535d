"""Links and presenter mode in the app: open a prepared view from the URL, copy a link to
the current view, large text for a projector, arrow keys for the lecture, named downloads.

Parsing and checking the link lives in `explorer.ui.links` (no gradio); this module only
wires it: `open_view` runs on page load, then the chosen tab's own run button is clicked,
so a link runs exactly the analysis a person would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gradio as gr

from explorer import images, lecture, models
from explorer.ui import common, links


@dataclass
class TabLink:
    """The components of one tab that a link sets, and the button that runs its analysis.

    Attributes:
        key: the tab's name in links (`explorer.ui.links.TABS`).
        image, model, width, height: the tab's inputs (None where the tab has none).
        run_id: elem_id of the run button clicked after a link is opened (None: nothing runs).
        extra: components a link sets on this tab only (attention: layer, fusion, head).
    """

    key: str
    image: gr.Image | None = None
    model: gr.Dropdown | None = None
    width: gr.Number | None = None
    height: gr.Number | None = None
    run_id: str | None = None
    extra: dict[str, gr.components.Component] = field(default_factory=dict)

    def inputs(self) -> list:
        return [c for c in (self.image, self.model, self.width, self.height) if c is not None]


def example_names() -> list[str]:
    return [p.stem for p in images.example_paths()]


def read_view(params) -> links.View:
    """The view a request's query parameters ask for, checked against the app's data."""
    view = links.parse_view(dict(params), example_names(), list(models.CATALOGUE),
                            len(lecture.STEPS))
    if view.tab == "attention" and (view.layer is not None or view.head != "mean"):
        geometry = common.model_geometry(view.model)
        if geometry is not None:
            view = links.fit_geometry(view, geometry.depth, geometry.num_heads)
    return view


def _tab_values(tab: TabLink, view: links.View) -> list:
    """The values a view gives one tab's inputs (`gr.skip()` for tabs it does not open)."""
    if tab.key != view.tab:
        return [gr.skip() for _ in tab.inputs()] + [gr.skip() for _ in tab.extra]
    values = []
    if tab.image is not None:
        values.append(next(str(p) for p in images.example_paths() if p.stem == view.example))
    if tab.model is not None:
        values.append(view.model or gr.skip())
    values += [view.size or 0 for c in (tab.width, tab.height) if c is not None]
    for name in tab.extra:
        if name == "layer":
            values.append(view.layer if view.layer is not None else gr.skip())
        elif name == "fusion":
            values.append(view.head if view.head in links.HEAD_FUSIONS else gr.skip())
        elif name == "head":
            values.append(links.head_choice(view.head))
    return values


def note_text(view: links.View) -> str:
    return "" if not view.notes else "**Link note:** " + " ".join(view.notes)


def wire(demo: gr.Blocks, tabs: gr.Tabs, note: gr.Markdown, presenter: gr.Checkbox,
         tab_links: list[TabLink], lecture_tab) -> None:
    """Open the link's view on load; then run its analysis (click its tab's run button)."""
    run_target = gr.Textbox(visible=False, elem_id="link-run-target")
    outputs = [note, run_target, lecture_tab.step, lecture_tab.example, lecture_tab.size]
    for tab in tab_links:
        outputs += tab.inputs() + list(tab.extra.values())
    # Last: selecting a tab and switching presenter mode fire events that read the values
    # above (the Lecture's select and presenter.change redraw the step), so those go first.
    outputs += [tabs, presenter]

    def open_view(request: gr.Request):
        """Set the tab, the example and the settings a link names (`/open_view`)."""
        view = read_view(request.query_params)
        run_id = next((t.run_id for t in tab_links if t.key == view.tab), None)
        if view.tab == "lecture":
            run_id = "lecture-open"  # the lecture draws its step itself (`lecture_if_open`)
        values = [gr.Markdown(note_text(view), visible=bool(view.notes)), run_id or "",
                  view.step, view.example, view.size or 0]
        for tab in tab_links:
            values += _tab_values(tab, view)
        # A plain address selects nothing: a tab clicked while the page loads stays open.
        chosen = gr.Tabs(selected=view.tab) if "tab" in request.query_params else gr.skip()
        return [*values, chosen, view.presenter or gr.skip()]

    def lecture_if_open(request: gr.Request):
        """Draw the linked lecture step (`/lecture_on_load`), read from the link itself."""
        from explorer.ui.lecture_tab import step_view  # the lecture tab imports this module

        view = read_view(request.query_params if request else {})
        if view.tab != "lecture":
            return tuple(gr.skip() for _ in lecture_tab.outputs)
        return step_view(view.step, view.example, view.size, view.presenter)

    demo.load(open_view, outputs=outputs, api_name="open_view", show_progress="hidden").then(
        None, inputs=[run_target, presenter], js=RUN_JS, api_name=False).then(
        lecture_if_open, outputs=lecture_tab.outputs, api_name="lecture_on_load",
        concurrency_limit=1, concurrency_id="lecture")
    presenter.change(None, inputs=presenter, js=PRESENTER_JS, api_name=False)


def link_row(key: str) -> tuple[gr.Button, gr.Textbox]:
    """The "copy a link to this view" button and the link it made, at the top of a tab.

    Made before the tab's own components (so it shows first); `wire_copy` connects it.
    Ids: ``{key}-copy-link``, ``{key}-link``.
    """
    with gr.Row():
        button = gr.Button("Copy a link to this view", size="sm", scale=0,
                           elem_id=f"{key}-copy-link")
        box = gr.Textbox(show_label=False, placeholder="a link to this view appears here",
                         buttons=["copy"], elem_id=f"{key}-link", scale=1, interactive=False)
    return button, box


def wire_copy(row: tuple[gr.Button, gr.Textbox], tab: TabLink, presenter: gr.Checkbox) -> None:
    """Clicking the row's button puts this tab's current view in the box and the clipboard."""
    button, box = row
    names = [n for n, c in (("image", tab.image), ("model", tab.model), ("width", tab.width),
                            ("height", tab.height)) if c is not None] + list(tab.extra)

    def link(is_presenter, *values):
        """The query string of this tab's current view (`/<tab>_link`)."""
        got = dict(zip(names, values, strict=True))
        model = got.get("model")
        size = int(got.get("width") or got.get("height") or 0) or None
        head = str(got.get("head") or "mean").removeprefix("head ")
        if head == "mean" and got.get("fusion") in links.HEAD_FUSIONS:
            head = got["fusion"]
        view = links.View(
            tab=tab.key, example=links.example_name(got.get("image"), example_names()),
            model=model if model in models.CATALOGUE and model != models.DEFAULT_MODEL else None,
            size=size, layer=int(got["layer"]) if got.get("layer") else None, head=head,
            presenter=bool(is_presenter))
        return links.view_query(view)

    button.click(link, inputs=[presenter, *tab.inputs(), *tab.extra.values()], outputs=box,
                 api_name=f"{tab.key}_link", queue=False).then(
        None, inputs=box, outputs=box, js=COPY_JS, api_name=False)


RUN_JS = """
(target, presenter) => {
  document.body.classList.toggle('presenter', !!presenter);
  if (target && target !== 'lecture-open') {
    setTimeout(() => document.getElementById(target)?.click(), 300);
  }
}
"""

COPY_JS = """
(q) => {
  if (!q || !q.startsWith('?')) return q;
  const url = location.origin + location.pathname + q;
  try { navigator.clipboard.writeText(url).catch(() => {}); } catch (e) {}
  return url;
}
"""

PRESENTER_JS = """
(on) => {
  document.body.classList.toggle('presenter', !!on);
  const url = new URL(location.href);
  if (on) url.searchParams.set('presenter', '1'); else url.searchParams.delete('presenter');
  history.replaceState(null, '', url.toString());
}
"""

# Page script: arrow keys step the lecture (not while typing); plotly and image downloads are
# named after the figure's label and the linked example; a switch picks PNG or SVG for plots
# (plotly's own "download plot" button, whose options gradio's gr.Plot does not expose).
HEAD = r"""
<script>
(() => {
  const slug = (s) => (s || 'figure').toLowerCase().replace(/[^a-z0-9]+/g, '-')
                                      .replace(/^-|-$/g, '').slice(0, 80);
  const lectureVisible = () => {
    const el = document.getElementById('lecture-next');
    return el && el.offsetParent !== null;
  };
  document.addEventListener('keydown', (e) => {
    const t = e.target;
    if (t && (t.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName))) return;
    if (e.altKey || e.ctrlKey || e.metaKey || !lectureVisible()) return;
    const id = {ArrowRight: 'lecture-next', ArrowLeft: 'lecture-prev',
                PageDown: 'lecture-next', PageUp: 'lecture-prev'}[e.key];
    if (id) { e.preventDefault(); document.getElementById(id).click(); }
  });
  const nameFigures = () => {
    const example = new URL(location.href).searchParams.get('example') || '';
    const format = document.body.dataset.plotFormat || 'png';
    document.querySelectorAll('.js-plotly-plot').forEach((gd) => {
      if (!gd._context) return;
      const block = gd.closest('.block');
      const label = block && block.querySelector('[data-testid="block-label"], label');
      const name = ['vit-explorer', example, slug(label && label.textContent)]
                     .filter(Boolean).join('_');
      gd._context.toImageButtonOptions = {format, filename: name, scale: 2};
    });
  };
  setInterval(nameFigures, 1000);
  // Image downloads: gradio names them after the served file ("image.png"); name them after
  // the figure's label instead (files already named by the app, vit-explorer_*, stay).
  document.addEventListener('click', (e) => {
    const a = e.target.closest && e.target.closest('a[download]');
    if (!a || (a.getAttribute('download') || '').startsWith('vit-explorer')) return;
    const block = a.closest('.block');
    const label = block && block.querySelector('[data-testid="block-label"], label');
    if (!label) return;
    const ext = ((a.getAttribute('download') || '').match(/\.[a-z0-9]+$/i) || ['.png'])[0];
    const example = new URL(location.href).searchParams.get('example') || '';
    a.setAttribute('download', ['vit-explorer', example, slug(label.textContent)]
                                 .filter(Boolean).join('_') + ext);
  }, true);
  window.vitExplorerPlotFormat = (f) => { document.body.dataset.plotFormat = f; nameFigures(); };
})();
</script>
"""

# Presenter mode: large text everywhere (gradio's size variables and the prose), plotly
# labels at least 18 px, figures as large as the screen allows.
CSS = """
body.presenter .gradio-container {
  --text-xxs: 18px; --text-xs: 18px; --text-sm: 20px; --text-md: 22px; --text-lg: 24px;
  --text-xl: 28px; --text-xxl: 32px; --block-label-text-size: 20px; --block-info-text-size: 18px;
  --block-title-text-size: 22px; --checkbox-label-text-size: 20px; --input-text-size: 22px;
  --button-large-text-size: 22px; --button-medium-text-size: 22px; --button-small-text-size: 20px;
  --section-header-text-size: 22px; --body-text-size: 22px; --prose-text-size: 22px;
  font-size: 22px;
}
body.presenter .gradio-container .prose,
body.presenter .gradio-container .prose p,
body.presenter .gradio-container .prose li { font-size: 24px !important; line-height: 1.45; }
body.presenter .gradio-container .prose h2 { font-size: 36px !important; }
body.presenter .js-plotly-plot text { font-size: 20px !important; }
body.presenter .js-plotly-plot .gtitle { font-size: 24px !important; }
body.presenter #lecture-image img { max-height: 78vh; }
#link-note { border-left: 4px solid #d97706; padding-left: 8px; }
"""
