"""Links and presenter mode in the app: open a prepared view from the URL, copy a link to
the current view, large text for a projector, arrow keys for the lecture, named downloads.

Parsing and checking the link lives in `explorer.ui.links` (no gradio); this module only
wires it: `open_view` runs on page load, then the chosen tab's own run button is clicked,
so a link runs exactly the analysis a person would. It imports no tab: each tab hands it a
`TabLink` (the Lecture, its `LectureTab`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import gradio as gr

from explorer import images, lecture, models
from explorer.plots.lecture import PRESENTER_FONT
from explorer.ui import common, links
from explorer.ui.attention_view import parse_head


@dataclass
class TabLink:
    """The components of one tab that a link sets, and the button that runs its analysis.

    Attributes:
        tab: the tab (`explorer.ui.links.TABS`).
        image, model, width, height: the tab's inputs (None where the tab has none).
        run_id: elem_id of the run button clicked after a link is opened (None: nothing runs).
        extra: components a link sets on this tab only (attention: layer, fusion, head).
    """

    tab: links.Tab
    image: gr.Image | None = None
    model: gr.Dropdown | None = None
    width: gr.Number | None = None
    height: gr.Number | None = None
    run_id: str | None = None
    extra: dict[str, gr.components.Component] = field(default_factory=dict)

    def inputs(self) -> dict[str, gr.components.Component]:
        """The components a link sets, by name."""
        named = {"image": self.image, "model": self.model, "width": self.width,
                 "height": self.height}
        return {**{n: c for n, c in named.items() if c is not None}, **self.extra}

    def query(self) -> Callable[..., str]:
        """``f(is_presenter, *values of inputs())``: the query string of this tab's view."""
        names = list(self.inputs())

        def link(is_presenter, *values):
            """The query string of this tab's current view (`/<tab>_link`)."""
            return links.view_query(self.view(dict(zip(names, values, strict=True)),
                                              bool(is_presenter)))

        return link

    def wire_copy(self, row: tuple[gr.Button, gr.Textbox], presenter: gr.Checkbox) -> None:
        """Clicking the row's button puts this tab's current view in the box and the
        clipboard."""
        button, box = row
        button.click(self.query(), inputs=[presenter, *self.inputs().values()], outputs=box,
                     api_name=f"{self.tab.key}_link", queue=False).then(
            None, inputs=box, outputs=box, js=COPY_JS, api_name=False)

    def view(self, got: dict, is_presenter: bool) -> links.View:
        """The `links.View` of this tab's current values (``got``: by `inputs` name)."""
        model = got.get("model")
        head = parse_head(got.get("head") or "mean")
        head = str(head + 1) if isinstance(head, int) else head
        if head == "mean" and got.get("fusion") in links.HEAD_FUSIONS:
            head = got["fusion"]
        return links.View(
            tab=self.tab.key, example=links.example_name(got.get("image"), example_names()),
            model=model if model in models.CATALOGUE and model != models.DEFAULT_MODEL else None,
            size=int(got.get("width") or got.get("height") or 0) or None,
            layer=int(got["layer"]) if got.get("layer") else None, head=head,
            sinks=links.sink_param(got.get("sinks")),
            presenter=is_presenter)

    def values(self, view: links.View) -> dict:
        """What ``view`` sets on this tab (nothing for a view of another tab)."""
        if self.tab.key != view.tab:
            return {}
        inputs, values = self.inputs(), {}
        if "image" in inputs:
            values["image"] = next(str(p) for p in images.example_paths()
                                   if p.stem == view.example)
        if "model" in inputs and view.model:
            values["model"] = view.model
        for side in ("width", "height"):
            if side in inputs:
                values[side] = view.size or 0
        if "layer" in inputs and view.layer is not None:
            values["layer"] = view.layer
        if "fusion" in inputs and view.head in links.HEAD_FUSIONS:
            values["fusion"] = view.head
        if "head" in inputs:
            values["head"] = links.head_choice(view.head)
        if "sinks" in inputs:
            values["sinks"] = links.sink_choice(view.sinks)
        return {inputs[name]: value for name, value in values.items()}


def example_names() -> list[str]:
    return [p.stem for p in images.example_paths()]


def read_view(params) -> links.View:
    """The view a request's query parameters ask for, checked against the app's data."""
    view = links.parse_view(dict(params), example_names(), list(models.CATALOGUE),
                            len(lecture.STEPS))
    if view.tab == links.ATTENTION.key and (view.layer is not None or view.head != "mean"):
        geometry = common.model_geometry(view.model)
        if geometry is not None:
            view = links.fit_geometry(view, geometry.depth, geometry.num_heads)
    return view


def note_text(view: links.View) -> str:
    return "" if not view.notes else "**Link note:** " + " ".join(view.notes)


def wire(demo: gr.Blocks, tabs: gr.Tabs, note: gr.Markdown, presenter: gr.Checkbox,
         tab_links: list[TabLink], lecture_tab) -> None:
    """Open the link's view on load; then run its analysis (click its tab's run button).

    Args:
        lecture_tab: the Lecture's `explorer.ui.lecture_tab.LectureTab` (its step, example
            and size, and how it draws a step).
    """
    run_target = gr.Textbox(visible=False, elem_id="link-run-target")
    outputs = [note, run_target, lecture_tab.step, lecture_tab.example, lecture_tab.size]
    for tab in tab_links:
        outputs += tab.inputs().values()
    # Last: selecting a tab and switching presenter mode fire events that read the values
    # above (the Lecture's select and presenter.change redraw the step), so those go first.
    outputs += [tabs, presenter]

    def open_view(request: gr.Request):
        """Set the tab, the example and the settings a link names (`/open_view`)."""
        view = read_view(request.query_params)
        run_id = next((t.run_id for t in tab_links if t.tab.key == view.tab), None)
        if view.tab == links.LECTURE.key:
            run_id = "lecture-open"  # the lecture draws its step itself (`lecture_if_open`)
        values = {note: gr.Markdown(note_text(view), visible=bool(view.notes)),
                  run_target: run_id or "", lecture_tab.step: view.step,
                  lecture_tab.example: view.example, lecture_tab.size: view.size or 0}
        for tab in tab_links:
            values.update(tab.values(view))
        # A plain address selects nothing: a tab clicked while the page loads stays open.
        # Nor does a link to the Lecture, the first tab: selecting it would fire its select
        # event, which reads the step before this sets it and draws step 1 after all.
        if "tab" in request.query_params and view.tab != links.LECTURE.key:
            values[tabs] = gr.Tabs(selected=view.tab)
        if view.presenter:
            values[presenter] = True
        return values

    def lecture_if_open(target, step, example, size, is_presenter):
        """Draw the linked lecture step (`/lecture_on_load`) with the step, example and size
        `open_view` set (not the address: by now it names what is on screen)."""
        if target != "lecture-open":
            return {}
        return lecture_tab.draw(step, example, size, is_presenter)

    demo.load(open_view, outputs=outputs, api_name="open_view", show_progress="hidden").then(
        None, inputs=[run_target, presenter], js=RUN_JS, api_name=False).then(
        **lecture_tab.outputs.event(lecture_if_open), api_name="lecture_on_load",
        inputs=[run_target, lecture_tab.step, lecture_tab.example, lecture_tab.size, presenter],
        concurrency_limit=1, concurrency_id="lecture")
    presenter.change(None, inputs=presenter, js=PRESENTER_JS, api_name=False)


def page_id(tab: links.Tab) -> str:
    """The elem_id of ``tab``'s page (``gr.Tab(elem_id=...)``): the address script asks
    whether that page is the one on screen."""
    return f"tab-{tab.key}"


def address_js(tab: links.Tab) -> str:
    """Page script: put a query string in the address bar (no reload, no new history entry),
    only while ``tab``'s page is the one on screen, so a hidden tab never claims it."""
    return ("(q) => { const page = document.getElementById(" + repr(page_id(tab)) + ");"
            " if (q && q.startsWith('?') && page && page.offsetParent !== null)"
            " history.replaceState(null, '', q); }")


def wire_address(pages: dict[str, gr.Tab], presenter: gr.Checkbox, tab_links: list[TabLink],
                 lecture_tab) -> None:
    """Keep the address bar on what the screen shows: opening a tab, or changing one of its
    linked settings (`TabLink.inputs`; the Lecture's step, example and size), writes that
    view's query (`links.view_query`) with ``history.replaceState``, so a reload or a copied
    address comes back to it.

    Args:
        pages: the app's tabs by key (`explorer.ui.links.TABS`).
        lecture_tab: the Lecture's `explorer.ui.lecture_tab.LectureTab`.
    """
    query = lecture_tab.outputs["query"]  # the drawn step's query (`lecture_tab.step_view`)
    to_lecture = address_js(links.LECTURE)
    lecture_tab.wire_open(pages[links.LECTURE.key]).then(None, inputs=query, js=to_lecture,
                                                         api_name=False)
    query.change(None, inputs=query, js=to_lecture, api_name=False)
    for tab in tab_links:
        address = gr.Textbox(visible=False, elem_id=f"{tab.tab.key}-address")
        triggers = [pages[tab.tab.key].select, presenter.change]
        triggers += [c.change for c in tab.inputs().values()]
        gr.on(triggers, tab.query(), inputs=[presenter, *tab.inputs().values()],
              outputs=address, api_name=False, queue=False, trigger_mode="always_last",
              show_progress="hidden").then(None, inputs=address, js=address_js(tab.tab),
                                           api_name=False)


def link_row(tab: links.Tab) -> tuple[gr.Button, gr.Textbox]:
    """The "copy a link to this view" button and the link it made, at the top of a tab.

    Made before the tab's own components (so it shows first); the tab wires it. Ids:
    ``{key}-copy-link``, ``{key}-link``.
    """
    with gr.Row(elem_classes=["link-row"]):
        button = gr.Button("Copy a link to this view", size="sm", scale=0,
                           elem_id=f"{tab.key}-copy-link", elem_classes=["link-button"])
        box = gr.Textbox(show_label=False, placeholder="a link to this view appears here",
                         buttons=["copy"], elem_id=f"{tab.key}-link", scale=1, interactive=False,
                         elem_classes=["link-box"])
    return button, box


def with_link_row(tab: links.Tab, build: Callable, ctx: common.TabContext):
    """A tab's "copy a link" row, then the tab itself (``build(ctx)``), then the row wired
    to it: `TabLink.wire_copy`, or the Lecture's own. Returns what ``build`` returned."""
    row = link_row(tab)
    built = build(ctx)
    built.wire_copy(row, ctx.presenter)
    return built


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

# The bar's "copy link": the address always names the view on screen (`wire_address`).
BAR_COPY_JS = """
() => {
  const url = location.href;
  const done = () => {
    document.body.dataset.copied = '1';
    setTimeout(() => delete document.body.dataset.copied, 2000);
  };
  try { navigator.clipboard.writeText(url).then(done, () => window.prompt('Copy this link:', url)); }
  catch (e) { window.prompt('Copy this link:', url); }
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
  // Presenter mode: where the lecture's step starts, so its figure takes the rest of the
  // screen (`CSS`, #lecture-body).
  const placeLecture = () => {
    const body = document.getElementById('lecture-body');
    if (!body || body.offsetParent === null) return;
    const root = document.documentElement.style;
    const set = (name, value) => root.getPropertyValue(name) !== value &&
                                 root.setProperty(name, value);
    set('--lecture-top', Math.round(body.getBoundingClientRect().top + window.scrollY) + 'px');
    const img = document.querySelector('#lecture-image img');
    const shown = img && img.offsetParent !== null && img.naturalHeight;
    set('--lecture-ar', shown ? (img.naturalWidth / img.naturalHeight).toFixed(3) : '1.45');
  };
  setInterval(placeLecture, 250);
  window.addEventListener('resize', placeLecture);
  // Presenter mode: a plot the server drew at the page's fonts (the tabs other than the
  // lecture's and the lab's, which draw theirs for the projector: `for_projector`) is laid
  // out again at the projector's, so plotly places its legend, titles and margins for the
  // text it draws (the CSS alone enlarged the text where plotly had laid it out small, and
  // legend entries ran into each other); with the mode off it gets its own fonts back. A
  // figure the server replaces is a new layout object: it is fitted again.
  // Then two things the larger text needs (`fitWords`): the figure grows by what its larger
  // margins took, so its data keeps the height it had; and a title or axis
  // title longer than its room (the figure's width, the axis's length) breaks over lines,
  // where it ran off the figure.
  const wrapWords = (text, chars) => text.split(' ').reduce((lines, word) => {
    const last = lines[lines.length - 1];
    if (last && (last + ' ' + word).length > chars) lines.push(word);
    else lines[lines.length - 1] = last ? last + ' ' + word : word;
    return lines;
  }, ['']).join('<br>');
  const fitWords = (gd, dataHeight) => {
    const fit = gd._presenterFit;
    if (!fit || fit.layout !== gd.layout) return;
    const grow = {};
    if (gd._fullLayout._size.h < dataHeight) {
      fit.was.height = gd.layout.height === undefined ? null : gd.layout.height;
      grow.height = Math.round(gd._fullLayout.height + dataHeight - gd._fullLayout._size.h);
    }
    const wrap = () => {
      if (gd._presenterFit !== fit) return;
      const edge = gd.querySelector('.main-svg').getBoundingClientRect();
      const texts = [['title.text', gd.querySelector('text.gtitle'),
                      (el) => edge.right - el.getBoundingClientRect().left - 8]];
      Object.keys(gd._fullLayout).filter((k) => /^[xy]axis[0-9]*$/.test(k)).forEach((k) => {
        const axis = gd._fullLayout[k];
        texts.push([`${k}.title.text`, gd.querySelector(`text.${axis._id}title`),
                    () => axis._length]);
      });
      const wrapped = {};
      texts.forEach(([path, el, room]) => {
        const text = path.split('.').reduce((o, k) => o && o[k], gd.layout);
        // plain one-line text only: markup and lines of the server's own are kept as drawn
        if (!el || typeof text !== 'string' || text !== el.textContent || /<|\n/.test(text))
          return;
        const length = el.getComputedTextLength(), space = room(el);
        if (length <= space) return;
        fit.was[path] = text;
        wrapped[path] = wrapWords(text, Math.max(8, Math.floor(text.length * space / length)));
      });
      if (Object.keys(wrapped).length) window.Plotly.relayout(gd, wrapped);
    };
    (Object.keys(grow).length ? window.Plotly.relayout(gd, grow) : Promise.resolve()).then(wrap);
  };
  const fitPlots = () => {
    const on = document.body.classList.contains('presenter');
    document.querySelectorAll('.js-plotly-plot').forEach((gd) => {
      if (!window.Plotly || !gd._fullLayout || !gd.layout) return;
      const fitted = gd._presenterFit && gd._presenterFit.layout === gd.layout;
      if (on && !fitted && gd._fullLayout.font.size < PRESENTER_FONT) {
        const was = {'font.size': gd._fullLayout.font.size,
                     'legend.font.size': (gd.layout.legend && gd.layout.legend.font || {}).size,
                     'title.font.size': (gd.layout.title && gd.layout.title.font || {}).size,
                     'margin.t': (gd.layout.margin || {}).t};
        const big = {'font.size': PRESENTER_FONT, 'legend.font.size': PRESENTER_FONT - 2,
                     'title.font.size': PRESENTER_FONT + 2,
                     // the block's label sits over the figure's top-left corner
                     'margin.t': Math.max(gd._fullLayout.margin.t, 120)};
        const legend = gd.layout.legend || {};
        if (legend.orientation === 'h' && legend.y < 0) {
          // a legend below the plot at a fixed fraction of it ran into the larger axis
          // title: at the figure's foot instead, where plotly makes room for it
          Object.assign(was, {'legend.yref': legend.yref, 'legend.y': legend.y,
                              'legend.yanchor': legend.yanchor});
          Object.assign(big, {'legend.yref': 'container', 'legend.y': 0,
                              'legend.yanchor': 'bottom'});
        }
        (gd.layout.annotations || []).forEach((a, i) => {
          was[`annotations[${i}].font.size`] = (a.font || {}).size;
          big[`annotations[${i}].font.size`] = PRESENTER_FONT - 2;
        });
        Object.keys(was).forEach((k) => { if (was[k] === undefined) was[k] = null; });  // null: default
        gd._presenterFit = {layout: gd.layout, was};
        const dataHeight = gd._fullLayout._size.h;
        window.Plotly.relayout(gd, big).then(() => fitWords(gd, dataHeight));
      } else if (!on && fitted) {
        const was = gd._presenterFit.was;
        gd._presenterFit = null;
        window.Plotly.relayout(gd, was);
      }
    });
  };
  setInterval(fitPlots, 500);
})();
</script>
""".replace("PRESENTER_FONT", str(PRESENTER_FONT))

# Presenter mode: large text everywhere (gradio's size variables and the prose), plotly
# labels at least 18 px. The screen is a projector's (1280x720 and up): the intro folds away,
# the title, settings and a copy-link button share one slim bar (the tabs' own copy-link
# rows hide: the address always names the view, `wire_address`), every tab name stays on one
# line, and a lecture step shows its words beside its figure, the figure as large as what is
# left of the screen allows (``--lecture-top``: where the step starts, set by `HEAD`).
CSS = """
#app-bar { align-items: center; }
#app-title h1 { margin: 0; }
body:not(.presenter) #bar-copy-link { display: none; }  /* gradio scopes a bare rule above body.* */
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
/* the lab's table of every run: 14 columns, a reference rather than a slide; at 22 px every
   cell broke over two or three lines on a 1280-px screen */
body.presenter #lab-runs-table * { font-size: 18px !important; }
body.presenter .js-plotly-plot .gtitle { font-size: 24px !important; }

/* one slim bar */
body.presenter .gradio-container > .main { padding-top: 4px; }
body.presenter #app-intro, body.presenter .link-row { display: none !important; }
body.presenter #app-bar { flex-wrap: nowrap; gap: 20px; min-height: 0; }
body.presenter #app-bar .form { flex-direction: row; flex-wrap: nowrap; align-items: center;
  gap: 20px; }
body.presenter #app-bar > *, body.presenter #app-bar .form, body.presenter #app-bar .block {
  flex: 0 0 auto !important; min-width: 0 !important; width: auto !important; }
body.presenter #app-bar .form, body.presenter #app-bar .block { background: none; border: 0;
  box-shadow: none; padding: 0; overflow: visible !important; }
body.presenter #app-title h1 { font-size: 24px !important; line-height: 1.2; }
body.presenter #presenter .label-text { font-size: 18px; }
body.presenter #plot-format { display: flex; flex-wrap: nowrap; align-items: center; gap: 8px; }
body.presenter #plot-format [data-testid="block-info"] { margin: 0; font-size: 18px;
  white-space: nowrap; }
body.presenter #plot-format label { padding: 2px 10px; font-size: 18px; }
body.presenter #bar-copy-link { display: inline-flex; margin-left: auto; flex: 0 0 auto;
  font-size: 18px; }
body[data-copied] #bar-copy-link::after { content: " ✓"; }

/* every tab name on one line */
body.presenter #app-tabs [role="tab"] { font-size: 18px; padding: 4px 12px; }

/* a lecture step on one screen: compact controls, words beside the figure */
body.presenter #lecture-controls { flex-wrap: nowrap; align-items: center; gap: 8px; }
body.presenter #lecture-controls > *, body.presenter #lecture-controls .form,
body.presenter #lecture-controls .block { flex: 0 0 auto !important; min-width: 0 !important;
  width: auto !important; }
body.presenter #lecture-controls button { font-size: 18px; padding: 6px 12px; min-height: 0;
  white-space: nowrap; }
body.presenter #lecture-controls .form { border: 0; background: none; box-shadow: none;
  flex-wrap: nowrap; gap: 8px; }
body.presenter #lecture-controls .block { padding: 2px 6px; display: flex; align-items: center;
  overflow: visible !important; }
body.presenter #lecture-controls label.container,
body.presenter #lecture-controls .container { display: flex; flex-direction: row;
  align-items: center; gap: 8px; }
body.presenter #lecture-controls [data-testid="block-info"] { margin: 0; font-size: 16px;
  white-space: nowrap; }
body.presenter #lecture-controls input { font-size: 18px; padding: 4px 8px; }
body.presenter #lecture-step input { width: 3.2em; }
body.presenter #lecture-size input { width: 4.2em; }
body.presenter #lecture-example .container > .wrap { width: 8em; }
body.presenter #lecture-body { height: max(320px, calc(100vh - var(--lecture-top, 200px) - 8px));
  flex-wrap: nowrap; align-items: stretch; gap: 16px; }
body.presenter #lecture-words { flex: 1 1 0 !important; min-width: 0 !important;
  flex-wrap: nowrap; overflow-y: auto; gap: 4px; }
body.presenter #lecture-words .prose h2 { font-size: 26px !important; margin: 0 0 6px 0; }
body.presenter #lecture-text .prose,
body.presenter #lecture-text .prose p,
body.presenter #lecture-text .prose li { font-size: 20px !important; line-height: 1.38; }
body.presenter #lecture-text .prose p { margin: 0 0 10px 0; }
body.presenter #lecture-text details { margin-top: 4px; }
body.presenter #lecture-text summary { cursor: pointer; color: var(--link-text-color);
  font-size: 18px; }
body.presenter #lecture-link .prose p { font-size: 18px !important; margin: 0; }
/* the figure: as wide as its aspect ratio (--lecture-ar, from the image) allows at the full
   height, at most 58% of the width; the words take the rest */
body.presenter #lecture-figure { flex: 0 0 auto !important; height: 100%; gap: 0;
  min-width: 0 !important; width: min(58%, calc((100vh - var(--lecture-top, 200px) - 8px)
  * var(--lecture-ar, 1.45))); }
body.presenter #lecture-image, body.presenter #lecture-plot { height: 100%; }
body.presenter #lecture-image [data-testid="block-label"],
body.presenter #lecture-plot [data-testid="block-label"] { display: none; }
body.presenter #lecture-image .image-container,
body.presenter #lecture-image .image-container > button,
body.presenter #lecture-image .image-frame { width: 100%; height: 100%; }
body.presenter #lecture-image img { width: 100%; height: 100%; max-height: none;
  object-fit: contain; }
body.presenter #lecture-plot .js-plotly-plot { height: calc(100% - 8px); }
#link-note { border-left: 4px solid #d97706; padding-left: 8px; }
"""
