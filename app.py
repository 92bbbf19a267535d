"""ViT Explorer: see how a Vision Transformer tokenises, attends and learns.

Run ``python app.py`` (see ``--help``). Nothing heavy happens at import: models load on the
first request that needs them and stay in `explorer.models.MODEL_CACHE`.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import threading
import time

import gradio as gr
import torch

from explorer import kernels, models
from explorer.ui import common, gradio_fixes, presenter
from explorer.ui.attention_tab import build_attention_tab
from explorer.ui.distance_tab import build_distance_tab
from explorer.ui.finetune_tab import build_finetune_tab
from explorer.ui.igpt_tab import build_igpt_tab
from explorer.ui.lab_tab import build_lab_tab
from explorer.ui.lecture_tab import build_lecture_tab, step_view
from explorer.ui.tokens_tab import build_tokens_tab

TITLE = "ViT Explorer"
HEADER = """
# ViT Explorer
Upload an image and see how a Vision Transformer works: how it cuts the image into patch
tokens, where every layer and head attends, how far attention reaches, how an image-GPT
completes a half-hidden picture pixel by pixel, and what fine-tuning on your own images
changes. Everything runs offline on a DINOv2 ViT-S/14; hub models work when online.
"""

# (label, key in links, builder): after the Lecture, one tab per concept. A builder returns
# the `presenter.TabLink` a link sets (None: a link only opens the tab).
TABS = [
    ("Patch tokens", "tokens", build_tokens_tab),
    ("Attention maps", "attention", build_attention_tab),
    ("Mean attention distance", "distance", build_distance_tab),
    ("iGPT", "igpt", build_igpt_tab),
    ("Fine-tune", "finetune", build_finetune_tab),
    ("Inductive bias & scale", "lab", build_lab_tab),
]


def build_demo(models_dir: str | None = None) -> gr.Blocks:
    """The whole app: the lecture as a path, then one tab per concept.

    Args:
        models_dir: the operator's checkpoints (``--models-dir``, else the
            ``VIT_EXPLORER_MODELS_DIR`` variable): each sub-folder in timm's layout appears
            in every model picker under its folder name. Web visitors name models, never paths.
    """
    gradio_fixes.apply()
    models_dir = models_dir or os.environ.get("VIT_EXPLORER_MODELS_DIR")
    if models_dir:
        models.register_models_dir(models_dir)
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(HEADER)
        with gr.Row():
            is_presenter = gr.Checkbox(False, label="Presenter mode (large text for a projector)",
                                       elem_id="presenter", scale=0, min_width=320)
            plot_format = gr.Radio(["png", "svg"], value="png", label="Plot downloads as",
                                   elem_id="plot-format", scale=0, min_width=220)
        note = gr.Markdown(visible=False, elem_id="link-note")
        tab_links = []
        with gr.Tabs() as tabs:
            with gr.Tab("Lecture", id="lecture") as lecture_page:
                copy_lecture = presenter.link_row("lecture")
                lecture = build_lecture_tab(is_presenter)
            for label, key, build in TABS:
                with gr.Tab(label, id=key):
                    row = presenter.link_row(key)
                    wants_presenter = "presenter" in inspect.signature(build).parameters
                    tab = (build(presenter=is_presenter) if wants_presenter else build()
                           ) or presenter.TabLink(key)
                    presenter.wire_copy(row, tab, is_presenter)
                    tab_links.append(tab)
        presenter.wire(demo, tabs, note, is_presenter, tab_links, lecture)
        copy_lecture[0].click(None, inputs=lecture.outputs[-1], outputs=copy_lecture[1],
                              js=presenter.COPY_JS, api_name=False)
        lecture_page.select(step_view, inputs=[lecture.step, lecture.example, lecture.size,
                                               is_presenter],
                            outputs=lecture.outputs, api_name="lecture_open",
                            concurrency_limit=1,
                            concurrency_id="lecture")
        plot_format.change(None, inputs=plot_format, js="(f) => window.vitExplorerPlotFormat(f)",
                           api_name=False)
        demo.unload(common.end_session)  # a closed tab's fine-tunes are deleted
    # A deliberate queue: analysis events share a concurrency id (set per event); anything
    # else defaults to one at a time, and at most this many requests may wait.
    demo.queue(default_concurrency_limit=1, max_size=int(os.environ.get("VIT_EXPLORER_QUEUE", "64")))
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="ViT Explorer: a Gradio app for Vision Transformers.")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="interface to listen on (0.0.0.0 for a LAN / container); default 127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                        help="port to listen on; default 7860")
    parser.add_argument("--models-dir", default=os.environ.get("VIT_EXPLORER_MODELS_DIR"),
                        help="folder of checkpoints (timm layout: config.json + "
                             "model.safetensors per sub-folder) offered by folder name in every "
                             "model picker; default $VIT_EXPLORER_MODELS_DIR")
    parser.add_argument("--data-dir", default=os.environ.get("VIT_EXPLORER_DATA_DIR"),
                        help="folder of image folders offered by name ('data: <folder>') as "
                             "datasets of the distance tab; default $VIT_EXPLORER_DATA_DIR")
    parser.add_argument("--share", action="store_true",
                        help="also open a temporary public gradio.live link (needs internet)")
    return parser.parse_args(argv)


def configure_threads() -> int:
    """Split the CPU cores between the requests that may run at once.

    Gradio runs up to `common.concurrency_limit()` analyses in parallel threads; if each used
    every core, they would fight over them (measured on 2 cores under load: one torch thread
    per request ran a ViT-S forward ~2x faster than two). ``VIT_EXPLORER_TORCH_THREADS``
    overrides.

    Also shortens the GIL's hand-over interval to ``VIT_EXPLORER_GIL_SWITCH_MS`` (default 1 ms;
    Python's is 5 ms). Every PyTorch call releases the GIL and takes it back when done; while
    another request thread runs Python (plots, gradio) it waits up to the interval for it.
    The iGPT sampler makes ~100 short calls per pixel, so it waited most: 8 users at 224 px,
    four interleaved pairs, wall 33.0–38.6 s against 38.1–43.8 s (BENCHMARKS.md).
    """
    default = max(1, (os.cpu_count() or 1) // common.concurrency_limit())
    threads = int(os.environ.get("VIT_EXPLORER_TORCH_THREADS", default))
    torch.set_num_threads(threads)
    sys.setswitchinterval(float(os.environ.get("VIT_EXPLORER_GIL_SWITCH_MS", "1")) / 1000)
    return threads


M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)


def glibc_function(name: str):
    """The C library's function ``name`` (``mallopt``, ``malloc_trim``), or None where the C
    library is not glibc (musl, macOS) and lacks it."""
    import ctypes
    import ctypes.util

    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def configure_memory() -> int | None:
    """Cap glibc's malloc arenas at ``VIT_EXPLORER_MALLOC_ARENAS`` (default 2).

    glibc gives each thread that allocates concurrently its own arena (up to 8 per core), and
    freed tensor memory stays in the arena that held it: with many request threads the
    server's resident memory grows with the number of threads, not with what is in use
    (BENCHMARKS.md "Serving a lecture hall": MALLOC_ARENA_MAX=2 cut the 8-user 518 px peak
    by a quarter). ``mallopt`` sets the cap at run time, for arenas made from now on; the
    environment variable MALLOC_ARENA_MAX, read at process start, wins when set.

    Returns:
        The cap set, or None (not glibc, or MALLOC_ARENA_MAX set).
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return None
    arenas = int(os.environ.get("VIT_EXPLORER_MALLOC_ARENAS", "2"))
    mallopt = glibc_function("mallopt")
    if mallopt is None:
        return None
    return arenas if mallopt(M_ARENA_MAX, arenas) == 1 else None


def trim_memory_every(seconds: float) -> threading.Thread | None:
    """Hand freed heap memory back to the system every ``seconds`` (glibc ``malloc_trim``).

    A forward pass at 518 px frees hundreds of MB when it ends, but glibc keeps freed chunks
    that sit below live ones in its heaps, so the server's resident memory stays at its high
    mark between requests and the next concurrent requests stack on top of it.
    ``malloc_trim(0)`` releases every free page of every arena (a few ms). Started by `main`
    (``VIT_EXPLORER_MALLOC_TRIM_S``, default 0.25 s; 0 turns it off); None where there is no
    glibc or it is off.
    """
    trim = glibc_function("malloc_trim") if seconds > 0 else None
    if trim is None:
        return None

    def loop() -> None:
        while True:
            time.sleep(seconds)
            trim(0)

    thread = threading.Thread(target=loop, name="malloc-trim", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> None:
    configure_memory()  # before the first request thread allocates
    trim_memory_every(float(os.environ.get("VIT_EXPLORER_MALLOC_TRIM_S", "0.25")))
    args = parse_args(argv)
    if args.data_dir:  # read where the datasets are listed (explorer.distance.operator_datasets)
        os.environ["VIT_EXPLORER_DATA_DIR"] = args.data_dir
    configure_threads()
    kernels.build_in_background()  # the attention kernel compiles (once) while we start
    build_demo(args.models_dir).launch(server_name=args.host, server_port=args.port,
                                       share=args.share, theme=gr.themes.Soft(),
                                       css=presenter.CSS, head=presenter.HEAD)


if __name__ == "__main__":
    main()
