"""Patch tokenisation tab: how a ViT turns an image into a sequence of tokens."""

from __future__ import annotations

import gradio as gr

from explorer import images, patches
from explorer.plots import tokens as token_plots
from explorer.ui import common
from explorer.ui.presenter import TabLink

INTRO = """
**An image is worth 16x16 words.** A ViT cuts the image into fixed-size patches, flattens
each one and projects it linearly to a token, adds a learned position embedding, and reads
the tokens in raster order (left to right, top to bottom) after its prefix tokens (class,
distillation, registers). Choose a resolution: any multiple of the patch size works, because
the position embeddings are interpolated to the new grid, as when fine-tuning at a higher
resolution than pretraining.
"""


def tokens(image_path, model_name, width, height, fit):
    """Tokenise one image and build all six views (the `/tokens` API endpoint)."""
    model, data_config, pixels = common.model_and_pixels(image_path, model_name, width, height, fit)
    with common.user_errors():
        result = patches.analyse_tokenization(model, pixels)
    shown = images.pixels_to_image(result.pixels, data_config)
    prefix = len(result.prefix_names)
    summary = (
        f"**{result.size[1]}x{result.size[0]} px** -> grid of **{result.grid[1]}x{result.grid[0]}** "
        f"patches of {result.patch[1]}x{result.patch[0]} px = **{result.grid[0] * result.grid[1]}** "
        f"patch tokens + {prefix} prefix ({', '.join(result.prefix_names) or 'none'}). Position embeddings "
        f"were trained on a {result.native_grid[1]}x{result.native_grid[0]} grid."
    )
    return (
        summary,
        token_plots.grid_overlay(shown, result.patch, first_index=prefix),
        token_plots.token_sequence(shown, result.patch, result.prefix_names),
        token_plots.filter_tiles(result.filters),
        token_plots.similarity_tiles(result.pos_similarity_native),
        token_plots.similarity_tiles(result.pos_similarity),
        token_plots.cost_figure(result.costs, result.size),
        token_plots.cost_table(result.costs),
        token_plots.feature_pca_image(result.feature_rgb, result.size),
    )


def build_tokens_tab() -> TabLink:
    """Components and events of the tab; call inside ``with gr.Tab(...)``.

    Returns:
        What a link to this tab sets (`explorer.ui.presenter`).
    """
    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column(scale=1):
            image, model = common.image_and_model("tokens", height=300)
            width, height, fit = common.resolution_inputs("tokens")
            run = gr.Button("Tokenise", variant="primary", elem_id="tokens-run")
        with gr.Column(scale=2):
            summary = gr.Markdown(elem_id="tokens-summary")
            grid = gr.Image(label="Patches and token indices", elem_id="tokens-grid",
                            format="png", interactive=False)
            pca = gr.Image(label="Last-layer patch features, PCA -> RGB (DINOv2-style)",
                           elem_id="tokens-pca", format="png", interactive=False)
    sequence = gr.Image(label="The token sequence, raster order (prefix tokens first)",
                        elem_id="tokens-sequence", format="png", interactive=False)
    with gr.Row():
        filters = gr.Image(label="Patch-embedding filters: top principal components (ViT Fig. 7 left)",
                           elem_id="tokens-filters", format="png", interactive=False)
        cost_plot = gr.Plot(label="Cost: patches vs one token per pixel", elem_id="tokens-cost")
    cost_md = gr.Markdown(elem_id="tokens-cost-table")
    with gr.Row():
        pos_native = gr.Image(label="Position-embedding similarity, native grid (ViT Fig. 7 centre; "
                                    "big grids: every k-th patch)",
                              elem_id="tokens-pos-native", format="png", interactive=False)
        pos_chosen = gr.Image(label="... interpolated to the chosen grid",
                              elem_id="tokens-pos-chosen", format="png", interactive=False)
    outputs = [summary, grid, sequence, filters, pos_native, pos_chosen, cost_plot, cost_md, pca]
    run.click(tokens, inputs=[image, model, width, height, fit], outputs=outputs,
              api_name="tokens", concurrency_limit=common.concurrency_limit(),
              concurrency_id="analysis")
    return TabLink("tokens", image, model, width, height, run_id="tokens-run")
