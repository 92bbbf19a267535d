"""Mean attention distance tab: the ViT paper's Fig. 7 (right), datasets, models, a CNN."""

from __future__ import annotations

import gradio as gr
import torch

from explorer import distance, lecture, models, patches
from explorer.plots import distance as plots
from explorer.ui import common, links
from explorer.ui.attention_view import Analysis
from explorer.ui.outputs import Outputs
from explorer.ui.presenter import TabLink

INTRO = """
**How far does each head look?** For every layer and head: the attention-weighted distance
in pixels between a query patch and the patches it attends to, averaged over the image
(ViT paper, Fig. 7 right). Compare models, a dataset's spread, and a CNN's receptive field.
"""

MEANING = """
**What the plot means, in plain words.** Each dot is one attention head. Its height says how
far, on average, that head's patches look for information: a low dot is a *local* head (it
mostly reads its neighbours, like a small convolution), a dot near the dotted line is a
*global* head (it reads the whole image evenly). In the ViT paper (averaged over many
images) some heads are already global in the first layers and distance grows with depth; the
line under the plot says what this image's profile does. The model *can* look everywhere
from the start and learns where that helps. A CNN cannot: its receptive field (cyan) grows
only layer by layer, and its *effective* field (measured from gradients on this image) is
smaller still, because it is built into the architecture (an inductive bias). The randomly
initialised ViT shows what comes from the architecture alone: near-uniform, global
attention everywhere, so the structure in the trained model is learned.
"""

RANDOM_LABEL = "random init (same architecture)"


def _entry(name, width, height) -> tuple[str, torch.nn.Module, dict, tuple[int, int]]:
    """``(label, model, data config, (height, width))`` of a web model name, as
    `explorer.distance.compare_models` takes it; the web name stays the label."""
    model, config = models.load_vit(common.load_name(name))
    return (name or models.DEFAULT_MODEL, model, config,
            common.resolution_for(model, config, width, height))


def per_image(image_path, model_name, others, random_init, cnn, width, height, fit, prefix, band,
              request: gr.Request | None = None) -> dict:
    """The Fig. 7-style ``plot`` for one image, the CNN's receptive fields (``erf``) and what
    was computed (``info``): the `/distance` endpoint."""
    image = common.load_upload(image_path)
    with common.user_errors():
        main = _entry(model_name, width, height)
        label, model, config, size = main
        entries = [main] + [_entry(n, width, height) for n in (others or []) if n != model_name]
        # this image's attention, if the session analysed it in the Attention tab already
        kept = common.session(request).peek(
            Analysis, common.ImageRequest(image_path, model_name, width, height, fit))
        if kept is None:
            series, rate = distance.compare_models(image, entries, fit, prefix)
        else:  # no second forward
            series, rate = distance.compare_models(image, entries[1:], fit, prefix)
            maps = kept.maps
            series.insert(0, (label, distance.mean_attention_distance(
                maps, maps.grid, maps.patch_size, maps.num_prefix_tokens, prefix)))
        if random_init:
            series.append((RANDOM_LABEL, distance.random_init_distance(
                label, model, config, size, fit, prefix)))
        rf = distance.mobilenet_receptive_fields(image, max(size)) if cnn else None
    patch = patches.patch_size(model)
    shown_band = band[1:] if band and band[0] == label else None
    uniform = distance.uniform_distance(patches.grid_for(size, patch), patch)
    fig = plots.distance_figure(series, shown_band, rf, uniform)
    info = (f"{label}: attention maps + distance at {size[1]}x{size[0]} px: "
            f"**{rate:.1f} images/s** on this machine." if kept is None else
            f"{label} at {size[1]}x{size[0]} px: distances from this image's maps in "
            "the Attention tab (no new forward pass).")
    if band and shown_band is None:
        info += f" (The dataset band was computed for {band[0]}; recompute it for this model.)"
    # the plotted profile of the main model in words (`explorer.lecture.distance_note`)
    info += "\n\n" + lecture.distance_note(lecture.distance_profile(series[0][1].cpu(), uniform))
    return {"plot": fig, "erf": plots.erf_mosaic(rf) if rf is not None else None, "info": info}


def dataset_band(model_name, source, n, zip_file, width, height, prefix,
                 progress=gr.Progress()):  # noqa: B008
    """Mean and spread per head over a dataset, cached per model (`/distance_dataset`).

    ``zip_file``: the uploaded zip for the "uploaded zip" source (no server folders).

    Returns:
        ``(band, info)``: the band kept for the plot (label, legend, mean, std) and a line.
    """
    with common.user_errors():
        label, model, config, size = _entry(model_name, width, height)
        stats = distance.cached_dataset_distance(
            model, config, source, int(n), zip_file, size, prefix,
            progress=lambda done, total: progress(done / total, desc=f"{done}/{total} images"))
    band = (label, f"{source}: mean ± std over {stats.n_images} images", stats.mean, stats.std)
    info = (f"Dataset band: {stats.n_images} images ({source}) at {size[1]}x{size[0]}, "
            f"**{stats.images_per_second:.1f} images/s** (first computation; cached afterwards).")
    return band, info


def refresh(image_path, *args) -> dict:
    """Redraw the plot after the band changes, if an image is there."""
    if not image_path:
        return {}
    return per_image(image_path, *args)


def other_models(current, request: gr.Request):
    """The overlay picker's choices for this session, keeping the current ones."""
    return gr.Dropdown(choices=common.model_choices(common.session(request).model_names()),
                       value=current)


def build_distance_tab(ctx: common.TabContext) -> TabLink:
    """Components and events of the tab; call inside ``with gr.Tab(...)``.

    Returns:
        What a link to this tab sets (`explorer.ui.presenter`).
    """
    gr.Markdown(INTRO)
    band = gr.State(None)
    with gr.Row():
        with gr.Column(scale=1):
            image, model = common.image_and_model("dist", height=240)
            others = gr.Dropdown(common.model_choices(models.model_names()), value=[],
                                 multiselect=True,
                                 label="Overlay other models", elem_id="dist-others",
                                 info="e.g. a model fine-tuned in the app")
            others.focus(other_models, inputs=others, outputs=others,
                         api_name="distance_models", queue=False, show_progress="hidden")
            with gr.Row():
                random_init = gr.Checkbox(True, label="Random init of the same architecture")
                cnn = gr.Checkbox(True, label="CNN: MobileNetV2 receptive fields")
            width, height, fit = common.resolution_inputs("dist")
            prefix = gr.Radio(["drop", "keep"], value="drop", label="Attention to prefix tokens",
                              info="drop: renormalise over patches; keep: count it as distance 0")
            run = gr.Button("Plot distances", variant="primary", elem_id="dist-run",
                            interactive=False)  # until an image is there
            with gr.Accordion("Dataset band", open=True):
                source = gr.Radio(distance.dataset_choices(), value="Fashion-MNIST",
                                  label="Dataset")
                n = gr.Slider(4, 512, value=64, step=4, label="Images", elem_id="dist-band-n")
                zip_file = gr.File(label="Zip of images (for 'uploaded zip')",
                                   file_types=[".zip"], type="filepath", elem_id="dist-band-zip")
                band_run = gr.Button("Compute dataset band", elem_id="dist-band-run")
                band_info = gr.Markdown(elem_id="dist-band-info")
        with gr.Column(scale=2):
            message = common.message_box("dist")
            plot = gr.Plot(label="Mean attention distance", elem_id="dist-plot")
            info = gr.Markdown(elem_id="dist-info")
            _, erf = common.figure("MobileNetV2 effective receptive fields (central unit, "
                                   "|gradient|)", "dist-erf", format="png")
            gr.Markdown(MEANING)

    out = Outputs(plot=plot, erf=erf, info=info, message=message)
    inputs = [image, model, others, random_init, cnn, width, height, fit, prefix, band]
    shown_in = {"show_progress_on": [message]}  # failures said there, not over the controls
    common.enable_with_image(image, run)
    plotted = run.click(**out.event(common.reported(per_image, "dist")), inputs=inputs,
                        api_name="distance",
                        validator=common.validator("image", "model", *[None] * 8), **shown_in,
                        **ctx.analysis())
    banded = band_run.click(common.reported(dataset_band, "dist", clear=False),
                            inputs=[model, source, n, zip_file, width, height, prefix],
                            outputs=[band, band_info], api_name="distance_dataset",
                            show_progress_on=[band_info], **ctx.analysis())
    refreshed = banded.success(**out.event(common.reported(refresh, "dist", clear=False),
                                           "plot", "erf", "info"),
                               inputs=inputs, api_name="distance_refresh", **shown_in)
    for event in (plotted, banded, refreshed):
        common.on_failure(event, "dist", message)
    return TabLink(links.DISTANCE, image, model, width, height, run_id="dist-run")
