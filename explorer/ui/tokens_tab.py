"""Patch tokenisation tab: how a ViT turns an image into a sequence of tokens."""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import threading
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from explorer import gpu, images, models, patches
from explorer.cache import KeyedCache
from explorer.plots import tokens as token_plots
from explorer.ui import common, links
from explorer.ui.outputs import Outputs
from explorer.ui.presenter import TabLink, read_view

INTRO = """
**An image is worth 16x16 words.** A ViT cuts the image into fixed-size patches, flattens
each one and projects it linearly to a token, adds a learned position embedding, and reads
the tokens in raster order (left to right, top to bottom) after its prefix tokens (class,
distillation, registers). Choose a resolution: any multiple of the patch size works, because
the position embeddings are interpolated to the new grid, as when fine-tuning at a higher
resolution than pretraining.
"""

# What `tokens` returns, in the order the API does (README, "Use it from code").
VIEWS = ("summary", "grid", "sequence", "filters", "pos_native", "pos_chosen", "cost_plot",
         "cost_table", "pca")


def tokens(image_path, model_name, width, height, fit) -> dict:
    """Tokenise one image and build every view (the `/tokens` API endpoint), by output name.

    A bundled example's views are kept (`EXAMPLE_VIEWS`, as image files encoded once), so a
    room clicking the same example is served from memory.
    """
    example = _example_key(image_path, model_name, width, height, fit)
    if example is None:
        return _tokens(image_path, model_name, width, height, fit)
    return EXAMPLE_VIEWS.get_or_build(
        example, lambda: _as_files(_tokens(image_path, model_name, width, height, fit)))


def first_example(request: gr.Request = None) -> dict:
    """The first tab's worked example when the page opens (`/tokens_example`): the first
    bundled photo and its views, the default model at its default size, from
    `EXAMPLE_VIEWS`. Nothing when a link opens this tab: the link sets its own example and
    runs it (`explorer.ui.presenter`), and two loads writing the same image would race."""
    params = dict(request.query_params) if request is not None else {}
    if params.get("tab") and read_view(params).tab == links.TOKENS.key:
        return {}
    path = common.example_images()[0]
    return {"image": path, **tokens(path, None, 0, 0, "crop")}


# Views of the bundled examples, per (example, model, size, fit): files of a few hundred kB.
EXAMPLE_VIEWS: KeyedCache[tuple] = KeyedCache(max_items=16)


@functools.cache
def _example_digests() -> dict[str, str]:
    return {hashlib.sha1(Path(p).read_bytes()).hexdigest(): p for p in common.example_images()}


def _example_key(image_path, model_name, width, height, fit) -> tuple | None:
    """The cache key of a bundled example's request (by content: uploads are copies), else
    None. Only catalogue models: a fine-tune or local checkpoint may change under its name."""
    if not image_path or (model_name or models.DEFAULT_MODEL) not in models.CATALOGUE:
        return None
    try:
        digest = hashlib.sha1(Path(image_path).read_bytes()).hexdigest()
    except OSError:
        return None
    if digest not in _example_digests():
        return None
    return (digest, model_name or models.DEFAULT_MODEL, int(width or 0), int(height or 0), fit)


def _as_files(views: dict) -> dict:
    """Image views written once as PNG files (Gradio then serves the file, no re-encoding)."""
    folder = Path(tempfile.gettempdir()) / "vit-explorer-examples"
    folder.mkdir(exist_ok=True)
    out = {}
    for name, value in views.items():
        if isinstance(value, np.ndarray):
            digest = hashlib.sha1(value.tobytes()).hexdigest()
            path = folder / f"{digest}-{value.shape[0]}x{value.shape[1]}.png"
            if not path.exists():
                partial = path.with_name(f".{path.name}.{threading.get_ident()}.part")
                Image.fromarray(value).save(partial, format="png")
                os.replace(partial, path)
            value = str(path)
        out[name] = value
    return out


def _tokens(image_path, model_name, width, height, fit) -> dict:
    model, data_config, pixels = common.model_and_pixels(image_path, model_name, width, height, fit)
    with common.user_errors():
        result = gpu.analyse_on_device(patches.analyse_tokenization, model, pixels)
    shown = images.pixels_to_image(result.pixels, data_config)
    prefix = len(result.prefix_names)
    summary = (
        f"**{result.size[1]}x{result.size[0]} px** -> grid of **{result.grid[1]}x{result.grid[0]}** "
        f"patches of {result.patch[1]}x{result.patch[0]} px = **{result.grid[0] * result.grid[1]}** "
        f"patch tokens + {prefix} prefix ({', '.join(result.prefix_names) or 'none'}). "
        + ("Position embeddings were" if result.pos_similarity is not None else
           "This model has **no** position embeddings (a learned relative-position bias in its "
           "attention instead); it was")
        + f" trained on a {result.native_grid[1]}x{result.native_grid[0]} grid."
    )
    native, chosen = result.pos_similarity_native, result.pos_similarity
    return {
        "summary": summary,
        "grid": token_plots.grid_overlay(shown, result.patch, first_index=prefix),
        "sequence": token_plots.token_sequence(shown, result.patch, result.prefix_names),
        "filters": token_plots.filter_tiles(result.filters),
        "pos_native": None if native is None else token_plots.similarity_tiles(native),
        "pos_chosen": None if chosen is None else token_plots.similarity_tiles(chosen),
        "cost_plot": token_plots.cost_figure(result.costs, result.size),
        "cost_table": token_plots.cost_table(result.costs),
        "pca": token_plots.feature_pca_image(result.feature_rgb, result.size),
    }


def build_tokens_tab(ctx: common.TabContext) -> TabLink:
    """Components and events of the tab; call inside ``with gr.Tab(...)``.

    Returns:
        What a link to this tab sets (`explorer.ui.presenter`).
    """
    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column(scale=1):
            image, model = common.image_and_model("tokens", height=300)
            width, height, fit = common.resolution_inputs("tokens")
            run = gr.Button("Tokenise", variant="primary", elem_id="tokens-run",
                            interactive=False)  # until an image is there
        with gr.Column(scale=2):
            message = common.message_box("tokens")
            summary = gr.Markdown(elem_id="tokens-summary")
            _, grid = common.figure("Patches and their token indices", "tokens-grid",
                                    format="png")
            _, pca = common.figure("Last-layer patch features, PCA → RGB (DINOv2-style)",
                                   "tokens-pca", format="png")
    _, sequence = common.figure("The token sequence, raster order (prefix tokens first)",
                                "tokens-sequence", format="png")
    with gr.Row():
        with gr.Column():
            _, filters = common.figure("Patch-embedding filters: top principal components "
                                       "(ViT Fig. 7 left)", "tokens-filters", format="png")
        cost_plot = gr.Plot(label="Cost: patches vs one token per pixel", elem_id="tokens-cost")
    cost_md = gr.Markdown(elem_id="tokens-cost-table")
    with gr.Row():
        with gr.Column():
            _, pos_native = common.figure("Position-embedding similarity, native grid (ViT Fig. 7 "
                                          "centre; big grids: every k-th patch)",
                                          "tokens-pos-native", format="png")
        with gr.Column():
            _, pos_chosen = common.figure("... interpolated to the chosen grid",
                                          "tokens-pos-chosen", format="png")
    out = Outputs(image=image, summary=summary, grid=grid, sequence=sequence, filters=filters,
                  pos_native=pos_native, pos_chosen=pos_chosen, cost_plot=cost_plot,
                  cost_table=cost_md, pca=pca, message=message)
    common.enable_with_image(image, run)
    # the API returns `VIEWS` in order, then the message (empty after a run that worked)
    tokenised = run.click(**out.event(common.reported(tokens, "tokens"), *VIEWS, "message"),
                          inputs=[image, model, width, height, fit],
                          validator=common.validator("image", "model", None, None, None),
                          api_name="tokens", show_progress_on=[message], **ctx.analysis())
    common.on_failure(tokenised, "tokens", message)
    # First impression: the page opens on a worked example. It is kept (the first visitor
    # computes it; the others wait on its key), so a room opening the page at once neither
    # fills the queue nor waits behind forward passes: no queue.
    gr.on(None, **out.event(first_example, "image", *VIEWS), inputs=None,
          api_name="tokens_example", queue=False, show_progress="minimal")
    return TabLink(links.TOKENS, image, model, width, height, run_id="tokens-run")
