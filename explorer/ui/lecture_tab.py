"""Lecture tab: the lecture's outline as a path of steps, each with a live figure.

The steps' words live in `explorer.lecture`; each image step's figure and the note that
describes it come from `explorer.ui.lecture_view` (no tensor math here), the lab steps' from
`explorer.ui.lab_view`. Previous / next buttons, the arrow keys
(the page script `explorer.ui.presenter.HEAD`) and ``?tab=lecture&step=N`` move along the
path.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from explorer import images, lecture
from explorer.plots import lab as lab_plots
from explorer.plots import lecture as lecture_plots
from explorer.ui import common, lab_view, lecture_view, links
from explorer.ui.outputs import Outputs
from explorer.ui.presenter import COPY_JS

FIGURE_DIR = Path(tempfile.gettempdir()) / "vit-explorer-figures"


def fig_lab_bias():
    try:
        return lab_plots.relative_bias_figure(lab_view.bias_tables())
    except FileNotFoundError:  # the grid keeps the model when its run finishes
        return lab_plots.still_training_figure("Learned relative-position bias w(i−j)",
                                               "The relative-attention model")


# The lab's steps: figures of the shipped grid; their notes are `lab_view.lecture_note`'s.
LAB_FIGURES: dict[str, Callable] = {
    "lab-data": lambda: lab_plots.data_figure(lab_view.grid_rows()),
    "lab-compute": lambda: lab_plots.scaling_figure(lab_view.grid_rows(),
                                                    lab_view.attempt_rows()),
    "lab-bias": fig_lab_bias,
}
FIGURES = {**lecture_view.FIGURES, **LAB_FIGURES}


def draw(figure: str, example: str, size: int | None, presenter: bool) -> tuple[object, str]:
    """(figure, note) of one step: image steps from `lecture_view` (note computed from the
    figure's data), lab steps with the grid's findings."""
    if figure in LAB_FIGURES:
        return LAB_FIGURES[figure](), lab_view.lecture_note(figure, lab_view.grid_rows())
    with common.user_errors():
        shown = lecture_view.FIGURES[figure](example, size, presenter)
        asked = lecture_view.prepared(example, size).asked
    got = lecture_view.prepared(example, size).tokens.size
    if size and asked != got:
        gr.Info(f"Resolution snapped to {got[1]}x{got[0]}: a multiple of the patch size.")
    return shown.figure, "\n\n" + shown.note


def figure_file(image, name: str) -> str:
    """Save an image figure as ``<name>.png`` so its download says what it shows."""
    FIGURE_DIR.mkdir(exist_ok=True)
    path = FIGURE_DIR / f"{name}.png"
    Image.fromarray(np.asarray(image)).save(path) if isinstance(image, np.ndarray) else image.save(path)
    return str(path)


def step_view(step, example, size, presenter) -> dict:
    """Everything one lecture step shows (the `/lecture_step` endpoint), by `LectureTab`
    output name: the image or the plot is hidden, whichever the step does not use. In
    presenter mode the note's explanation folds away (`lecture.fold_details`), so the words
    and the figure share one screen."""
    count = len(lecture.STEPS)
    step = min(max(int(step or 1), 1), count)
    s = lecture.STEPS[step - 1]
    size = int(size) if size else None
    name = f"vit-explorer_{example}_step{step}_{s.caption}"
    made, note = draw(s.figure, example, size, bool(presenter))
    view = links.View(tab=links.LECTURE.key, example=example, size=size, step=step,
                      presenter=bool(presenter))
    tab_view = links.View(tab=s.tab, example=example, size=size, presenter=bool(presenter))
    if isinstance(made, np.ndarray | Image.Image):
        image = gr.Image(value=figure_file(made, name), visible=True, label=s.caption)
        plot = gr.Plot(value=None, visible=False)
    else:
        image = gr.Image(value=None, visible=False)
        plot = gr.Plot(value=lecture_plots.for_projector(made, bool(presenter), fill=True), visible=True,
                       label=name)
    if presenter:  # what fits beside the figure; the rest a click away
        note = "\n\n" + lecture.fold_details(note, lecture.PRESENTER_CHARS - len(s.text))
    text = s.text + note
    return {"heading": f"## Step {step} of {count}: {s.title}", "text": text,
            "image": image, "plot": plot,
            "link": f"[Open the full view in its tab →]({links.view_query(tab_view)})",
            "query": links.view_query(view)}


# Previous / next move the step number in the page itself, at once, so every click counts
# however fast they come (a click used to read the step before the last one was drawn);
# the step's drawing follows the number (`trigger_mode="always_last"`).
STEP_JS = "(s) => Math.min(Math.max((Math.round(+s) || 1) + ({delta}), 1), {count})"


@dataclass
class LectureTab:
    """What the app and a link need of the Lecture (`explorer.ui.presenter`).

    Attributes:
        step, example, size: the inputs a link sets.
        outputs: everything a step shows, by name (`step_view`'s keys).
        settings: the inputs every drawing reads after the step: example, size, presenter.
    """

    step: gr.Number
    example: gr.Dropdown
    size: gr.Number
    outputs: Outputs
    settings: list

    draw = staticmethod(step_view)  # how the Lecture draws a step, for a link to it

    def wire_copy(self, row: tuple[gr.Button, gr.Textbox], presenter: gr.Checkbox) -> None:
        """The "copy a link" button copies the address of the step shown."""
        button, box = row
        button.click(None, inputs=self.outputs["query"], outputs=box,
                     js=COPY_JS, api_name=False)

    def wire_open(self, page: gr.Tab):
        """Opening the Lecture's tab draws the current step (`/lecture_open`); returns the
        event (the address follows it: `explorer.ui.presenter.wire_address`)."""
        return page.select(**self.outputs.event(step_view), inputs=[self.step, *self.settings],
                           api_name="lecture_open", concurrency_limit=1,
                           concurrency_id="lecture")


def build_lecture_tab(ctx: common.TabContext) -> LectureTab:
    """Components and events of the tab; call inside ``with gr.Tab(...)``."""
    names = [p.stem for p in images.example_paths()]
    count = len(lecture.STEPS)
    with gr.Row(elem_id="lecture-controls"):
        prev = gr.Button("← Previous", elem_id="lecture-prev", scale=0)
        step = gr.Number(value=1, precision=0, label="Step", minimum=1, maximum=count,
                         elem_id="lecture-step", scale=0, min_width=90)
        nxt = gr.Button("Next →", variant="primary", elem_id="lecture-next", scale=0)
        example = gr.Dropdown(names, value=names[0], label="Example", elem_id="lecture-example",
                              scale=1)
        size = gr.Number(value=0, precision=0, minimum=0, label="Size (px, 0 = model default)",
                         elem_id="lecture-size", scale=1)
        full = gr.Button("Full-screen figure", elem_id="lecture-fullscreen", scale=0)
    # the words on the left, the figure beside them as large as the screen allows
    with gr.Row(elem_id="lecture-body"):
        with gr.Column(scale=2, elem_id="lecture-words"):
            heading = gr.Markdown(elem_id="lecture-heading")
            text = gr.Markdown(elem_id="lecture-text", elem_classes=["lecture-text"])
            link = gr.Markdown(elem_id="lecture-link")
        with gr.Column(scale=3, elem_id="lecture-figure"):
            image = gr.Image(format="png", interactive=False, elem_id="lecture-image",
                             buttons=["download", "fullscreen"])
            plot = gr.Plot(visible=False, elem_id="lecture-plot")
    query = gr.Textbox(visible=False, elem_id="lecture-query")
    out = Outputs(heading=heading, text=text, image=image, plot=plot, link=link, query=query)
    for button, delta in ((prev, -1), (nxt, 1)):
        button.click(None, inputs=step, outputs=step, js=STEP_JS.format(delta=delta, count=count),
                     api_name=False)
    # Every event that draws a step shares one queue of size one ("lecture"): while one step
    # draws, only the last step asked for waits, so the step drawn last is the one asked last.
    settings = [example, size, ctx.presenter]
    gr.on([step.change, example.change, size.submit, ctx.presenter.change],
          **out.event(step_view), inputs=[step, *settings], api_name="lecture_step",
          concurrency_limit=1, concurrency_id="lecture", trigger_mode="always_last",
          show_progress="minimal")
    full.click(None, js="() => { const el = [...document.querySelectorAll("
                        "'#lecture-image, #lecture-plot')].find(e => e.offsetParent);"
                        " el && el.requestFullscreen && el.requestFullscreen(); }",
               api_name=False)
    return LectureTab(step, example, size, out, settings)
