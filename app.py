"""ViT Explorer: see how a Vision Transformer tokenises, attends and learns.

Run ``python app.py`` (see ``--help``; every setting: `explorer.settings.Settings`). Nothing
heavy happens at import: models load on the first request that needs them and stay in
`explorer.models.MODEL_CACHE`.
"""

from __future__ import annotations

import gradio as gr

from explorer import kernels, tuning
from explorer.settings import Settings
from explorer.ui import common, gradio_fixes, links, presenter
from explorer.ui.attention_tab import build_attention_tab
from explorer.ui.distance_tab import build_distance_tab
from explorer.ui.finetune_tab import build_finetune_tab
from explorer.ui.igpt_tab import build_igpt_tab
from explorer.ui.lab_tab import build_lab_tab
from explorer.ui.lecture_tab import build_lecture_tab
from explorer.ui.tokens_tab import build_tokens_tab

TITLE = "# ViT Explorer"
INTRO = """
Upload an image and see how a Vision Transformer works: how it cuts the image into patch
tokens, where every layer and head attends, how far attention reaches, how an image-GPT
completes a half-hidden picture pixel by pixel, and what fine-tuning on your own images
changes. Everything runs offline on a DINOv2 ViT-S/14; hub models work when online.
"""

# After the Lecture, one tab per concept (`explorer.ui.links.TABS` is the order links know).
TABS = ((links.TOKENS, build_tokens_tab), (links.ATTENTION, build_attention_tab),
        (links.DISTANCE, build_distance_tab), (links.IGPT, build_igpt_tab),
        (links.FINETUNE, build_finetune_tab), (links.LAB, build_lab_tab))


def build_demo(settings: Settings | None = None) -> gr.Blocks:
    """The whole app: the lecture as a path, then one tab per concept.

    Args:
        settings: the app's settings (default: the environment's, `Settings.from_env`).
    """
    settings = settings or Settings.from_env()
    gradio_fixes.apply()
    common.apply_settings(settings)
    with gr.Blocks(title="ViT Explorer") as demo:
        # One bar: the title and the settings (in presenter mode the intro folds away and the
        # open tab's copy-link row joins this bar: `presenter.CSS`).
        with gr.Row(elem_id="app-bar", equal_height=True):
            gr.Markdown(TITLE, elem_id="app-title")
            is_presenter = gr.Checkbox(False, label="Presenter mode (large text for a projector)",
                                       elem_id="presenter", scale=0, min_width=320)
            plot_format = gr.Radio(["png", "svg"], value="png", label="Plot downloads as",
                                   elem_id="plot-format", scale=0, min_width=220)
            copy = gr.Button("Copy link", size="sm", scale=0, elem_id="bar-copy-link")
        copy.click(None, js=presenter.BAR_COPY_JS, api_name=False)
        gr.Markdown(INTRO, elem_id="app-intro")
        note = gr.Markdown(visible=False, elem_id="link-note")
        ctx = common.TabContext(settings, is_presenter)
        pages = {}
        # "wrap": every tab's name stays in view (gradio's default "menu" hides the last
        # ones behind "…" on a projector's width)
        with gr.Tabs(overflow_behavior="wrap", elem_id="app-tabs") as tabs:
            with gr.Tab(links.LECTURE.title, id=links.LECTURE.key,
                        elem_id=presenter.page_id(links.LECTURE)) as pages[links.LECTURE.key]:
                lecture = presenter.with_link_row(links.LECTURE, build_lecture_tab, ctx)
            tab_links = []
            for tab, build in TABS:
                with gr.Tab(tab.title, id=tab.key, elem_id=presenter.page_id(tab)) as pages[tab.key]:
                    tab_links.append(presenter.with_link_row(tab, build, ctx))
        presenter.wire(demo, tabs, note, is_presenter, tab_links, lecture)
        presenter.wire_address(pages, is_presenter, tab_links, lecture)
        plot_format.change(None, inputs=plot_format, js="(f) => window.vitExplorerPlotFormat(f)",
                           api_name=False)
        demo.unload(common.end_session)  # a closed tab's fine-tunes are deleted
    # A deliberate queue: analysis events share a concurrency id (set per event); anything
    # else defaults to one at a time, and at most this many requests may wait.
    demo.queue(default_concurrency_limit=1, max_size=settings.queue_size)
    return demo


def main(argv: list[str] | None = None) -> None:
    settings = Settings.parse(argv)
    tuning.tune(settings)  # before the first request thread allocates
    kernels.build_in_background()  # the attention kernel compiles (once) while we start
    build_demo(settings).launch(server_name=settings.host, server_port=settings.port,
                                share=settings.share, theme=gr.themes.Soft(),
                                css=presenter.CSS, head=presenter.HEAD)


if __name__ == "__main__":
    main()
