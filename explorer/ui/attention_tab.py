"""Attention tab: every layer and head, rollout, a clicked query patch, prefix tokens."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import gradio as gr
import numpy as np
import torch

from explorer import attention, images, models, patches
from explorer.plots import attention as plots
from explorer.plots.colors import COLORMAPS
from explorer.store import STORE, Ref
from explorer.ui import attention_view, common
from explorer.ui.presenter import TabLink

INTRO = """
**Where does each token look?** Every block mixes tokens with softmax(QKᵀ/√d): one map per
head. Below: the class token's attention in a chosen layer for every head, the same for all
layers at a glance, *rollout* (attention chained through the layers with the residual
connection counted as identity, Abnar & Zuidema 2020), DINO-style masks, and the prefix
tokens. **Click a patch** on the input to see what that patch attends to.
"""

HEAD_CHOICES = ["mean", "max", "min"]
N_VIEWS = 10  # outputs of `render`
# Views are photos under colour maps: JPEG encodes them in ~1 ms where PNG took 20-150 ms
# each (most of a re-render's server time; BENCHMARKS.md, "Serving a lecture hall").
VIEW_FORMAT = "jpeg"


def head_choices(num_heads: int) -> list[str]:
    """The query-head dropdown's choices: the fusions, then "head 1" .. "head <num_heads>"."""
    return HEAD_CHOICES + [f"head {h}" for h in range(1, num_heads + 1)]


def view_labels(geometry: patches.ModelGeometry) -> dict[str, str]:
    """Labels of the views whose source token depends on the model: its class token, if it
    has one, else what the patches receive on average (`explorer.patches.has_class_token`)."""
    source = "Class token" if geometry.class_token else "Mean over patch queries"
    return {"heads": f"{source} -> patches, every head of the chosen layer, and fused",
            "strip": f"{source} -> patches, every layer (fused)",
            "rollout": f"Attention rollout ({source.lower()})"}


def geometry_updates(geometry: patches.ModelGeometry | None, layer=None, start=None, head=None):
    """Control updates for a model: layer and start sliders, head choices, view labels.

    Keeps a chosen value that still fits the model (layer default: the last; start: the
    first); ``None`` (no model) changes nothing.
    """
    if geometry is None:
        return tuple(gr.skip() for _ in range(6))
    depth, choices = geometry.depth, head_choices(geometry.num_heads)
    labels = view_labels(geometry)
    return (gr.Slider(maximum=depth, value=min(int(layer or depth), depth)),
            gr.Slider(maximum=depth, value=min(int(start or 1), depth)),
            gr.Dropdown(choices=choices, value=head if head in choices else "mean"),
            gr.Image(label=labels["heads"]), gr.Image(label=labels["strip"]),
            gr.Image(label=labels["rollout"]))


def model_controls(model_name):
    """Controls for a newly picked model (`/attention_geometry`): its last layer, rollout from
    its first, its heads (query map back to "mean"), and view labels for its tokens."""
    return geometry_updates(common.model_geometry(model_name))


@dataclass
class Session:
    """What one analysis leaves for the follow-up events, kept in `explorer.store.STORE`
    (``gr.State`` holds only its `Ref`)."""

    maps: attention.AttentionMaps
    geometry: patches.ModelGeometry
    shown: np.ndarray  # (H, W, 3) the model's input as displayed
    prefix_share: object  # (L, P) tensor, computed once per image
    relevance: object | None  # (rows, cols) class-specific map, classifier models only
    relevance_note: str
    note: str
    drawn: tuple | None = None  # the settings the session's views were last drawn with


SETTINGS = ("layer", "fusion", "roll_fusion", "discard", "start", "keep", "opacity", "cmap")
# The settings each of `render`'s outputs depends on: a re-render sends only what changed.
DEPENDS = [{"layer", "fusion", "opacity", "cmap"}, {"fusion", "opacity", "cmap"},
           {"roll_fusion", "discard", "start", "opacity", "cmap"}, {"layer", "keep"}, set(),
           {"layer", "cmap"}, {"layer"}, {"layer"}, {"opacity", "cmap"}, set()]


def _analyse(image_path, model_name, width, height, fit) -> Session:
    model, data_config, pixels = common.model_and_pixels(image_path, model_name, width, height, fit)
    with common.user_errors():
        # kept in the store: float16 q, k and head means (half the bytes), cast per block
        maps = attention.capture(model, pixels, keep_dtype=torch.float16)
        relevance, note = None, "Class-specific map: only for models with a classifier head."
        if getattr(model, "num_classes", 0):
            rel, target = attention.class_relevance(model, pixels)
            names = getattr(model, "class_names", None)
            label = names[int(target[0])] if names else f"class {int(target[0])}"
            relevance, note = rel[0], f"Relevance for the predicted **{label}** (Chefer et al.)."
    share = attention.prefix_attention_share(maps)[:, 0]
    rows, cols = maps.grid
    size = tuple(pixels.shape[-2:])
    summary = (f"**{models.describe(model_name)}** {size[1]}x{size[0]} px, {cols}x{rows} patches, "
               f"{maps.num_layers} layers x {maps.num_heads} heads, prefix: "
               f"{', '.join(maps.prefix_names) or 'none'}.")
    return Session(maps, patches.model_geometry(model, data_config),
                   images.pixels_to_image(pixels, data_config), share, relevance, note, summary)


def kept(ref: Ref | None) -> Session:
    """The session's analysis from the store; after an eviction, analysed again from the
    inputs in its ref (or, if that upload is gone, a message saying to press the button)."""
    if ref is None:
        raise gr.Error("Run the analysis first (press Show attention).")
    try:
        return STORE.get_or_rebuild(ref, _analyse)
    except gr.Error as err:
        raise gr.Error("This analysis was dropped from the server's memory and cannot be "
                       "redone: press Show attention again.") from err


def render(session: Session | None, layer, fusion, roll_fusion, discard, start, keep, opacity, cmap,
           only: set[int] | None = None):
    """All per-image views from an analysis (``only``: just those outputs, others skipped)."""
    if session is None:
        raise gr.Error("Run the analysis first (press Show attention).")
    maps, shown, layer = session.maps, session.shown, int(layer) - 1
    with common.user_errors(), _index_errors():
        v = attention_view.attention_views(maps, min(layer, maps.num_layers - 1), fusion,
                                           roll_fusion, float(discard), int(start) - 1,
                                           float(keep), prefix_share=session.prefix_share)
    flagged = int(v.high_norm.sum())
    norm_note = (f"Block {v.layer + 1}: **{flagged}** patch token(s) above {v.norm_threshold:.1f} "
                 "(2x the median patch norm).")
    relevance = session.relevance
    views = (
        lambda: plots.head_grid(shown, v.heads, v.fused, fusion, v.layer, opacity, cmap),
        lambda: plots.layer_strip(shown, v.per_layer, opacity, cmap),
        lambda: plots.heat_overlay(shown, v.rollout, opacity, cmap),
        lambda: plots.mask_grid(shown, v.masks, float(keep), v.layer),
        lambda: plots.prefix_share_figure(v.prefix_share, maps.prefix_names),
        lambda: plots.token_norm_map(shown, v.norms[maps.num_prefix_tokens:], maps.grid,
                                     v.high_norm, cmap),
        lambda: plots.token_norm_figure(v.norms, maps.prefix_names, v.norm_threshold, v.layer),
        lambda: norm_note,
        lambda: (plots.heat_overlay(shown, relevance, opacity, cmap)
                 if relevance is not None else None),
        lambda: session.relevance_note,
    )
    return tuple(draw() if only is None or i in only else gr.skip() for i, draw in enumerate(views))


def rerender(ref: Ref | None, *settings):
    """Redraw the kept analysis after a setting changes (the `/attention_views` endpoint):
    only the views whose settings changed since the session's last drawing (`DEPENDS`; the
    others are left as shown); nothing to do before the first analysis."""
    if ref is None:
        return tuple(gr.skip() for _ in range(N_VIEWS))
    session = kept(ref)
    before, session.drawn = session.drawn, settings
    if before is None:  # first drawing of a rebuilt analysis: everything
        return render(session, *settings)
    changed = {name for name, old, new in zip(SETTINGS, before, settings, strict=True) if old != new}
    return render(session, *settings, only={i for i, d in enumerate(DEPENDS) if d & changed})


def analyse_and_render(image_path, model_name, width, height, fit, layer, fusion, roll_fusion,
                       discard, start, keep, opacity, cmap, head="mean",
                       request: gr.Request | None = None):
    """Analyse an image and build every view (the `/attention` endpoint).

    Also returns the controls fitted to the analysed model (`geometry_updates`), so the layer
    and head choices always match the maps shown, and the `Ref` of the kept analysis.
    """
    inputs = (image_path, model_name, width, height, fit)
    session = _analyse(*inputs)
    ref = STORE.keep(getattr(request, "session_hash", None), "attention", inputs, session)
    depth = session.geometry.depth
    layer, start = min(int(layer or depth), depth), min(int(start or 1), depth)
    views = render(session, layer, fusion, roll_fusion, discard, start, keep, opacity, cmap)
    session.drawn = (layer, fusion, roll_fusion, discard, start, keep, opacity, cmap)
    return (ref, session.note, session.shown, *views,
            *geometry_updates(session.geometry, layer, start, head),
            None, None, "Click a patch on the input image.")


def pick_patch(ref: Ref | None, evt: gr.SelectData):
    """Turn a click on the input image into a (row, col) patch position."""
    if ref is None:
        raise gr.Error("Run the analysis first, then click a patch.")
    session = kept(ref)
    (ph, pw), (rows, cols) = session.maps.patch_size, session.maps.grid
    x, y = evt.index
    return min(int(y) // ph, rows - 1), min(int(x) // pw, cols - 1)


def query(ref: Ref | None, row, col, layer, head, opacity, cmap):
    """One query patch's attention: chosen layer and head, and across layers."""
    if ref is None or row is None or col is None:
        raise gr.Error("Run the analysis first, then click a patch.")
    session = kept(ref)
    maps, cell = session.maps, (int(row), int(col))
    head_arg = head if head in HEAD_CHOICES else int(str(head).split()[-1]) - 1
    with common.user_errors(), _index_errors():
        in_layer, all_layers = attention_view.query_views(maps, *cell, int(layer) - 1, head_arg)
    info = (f"Query patch row {cell[0]}, column {cell[1]} (token {maps.token_index(*cell)}), "
            f"layer {int(layer)}, head: {head}.")
    return (plots.heat_overlay(session.shown, in_layer, opacity, cmap, cell),
            plots.layer_strip(session.shown, all_layers, opacity, cmap, cell), info)


@contextlib.contextmanager
def _index_errors() -> Iterator[None]:
    """Out-of-range layer/head/patch (possible from the API) become a clear gr.Error."""
    try:
        yield
    except (IndexError, ValueError) as err:
        raise gr.Error(str(err)) from err


def build_attention_tab() -> TabLink:
    """Components and events of the tab; call inside ``with gr.Tab(...)``.

    Returns:
        What a link to this tab sets (`explorer.ui.presenter`).
    """
    gr.Markdown(INTRO)
    session = gr.State(None)
    geometry = common.default_geometry()  # the picker starts on the default model
    depth, labels = geometry.depth, view_labels(geometry)
    with gr.Row():
        with gr.Column(scale=1):
            image, model = common.image_and_model("attn", height=260)
            width, height, fit = common.resolution_inputs("attn")
            run = gr.Button("Show attention", variant="primary", elem_id="attn-run")
        with gr.Column(scale=1):
            # Layer, start and head limits come from the model: the default's at first, then
            # `model_controls` on every model change and `analyse_and_render` with each run.
            layer = gr.Slider(1, max(depth, 2), value=depth, step=1, label="Layer",
                              elem_id="attn-layer",
                              info="1 = first block; the maximum is the model's depth")
            fusion = gr.Radio(HEAD_CHOICES, value="mean", label="Fuse heads by")
            with gr.Accordion("Rollout", open=True):
                roll_fusion = gr.Radio(HEAD_CHOICES, value="mean", label="Rollout head fusion")
                discard = gr.Slider(0, 0.95, value=0.0, step=0.05, label="Discard ratio",
                                    info="share of the weakest links dropped per layer")
                start = gr.Slider(1, max(depth, 2), value=1, step=1, label="Start layer",
                                  elem_id="attn-start")
            keep = gr.Slider(0.1, 1.0, value=0.6, step=0.05, label="DINO mask: attention mass kept")
            with gr.Row():
                opacity = gr.Slider(0, 1, value=0.6, step=0.05, label="Overlay opacity")
                cmap = gr.Dropdown(COLORMAPS, value="inferno", label="Colour map")
        with gr.Column(scale=1):
            summary = gr.Markdown(elem_id="attn-summary")
            shown = gr.Image(label="Input as the model sees it: click a patch", format=VIEW_FORMAT,
                             interactive=False, elem_id="attn-input")
            query_info = gr.Markdown("Click a patch on the input image.", elem_id="attn-query-info")
            query_head = gr.Dropdown(head_choices(geometry.num_heads), value="mean",
                                     label="Query map: head",
                                     elem_id="attn-query-head")
            with gr.Row():
                q_row = gr.Number(label="Patch row (0-based)", precision=0, elem_id="attn-q-row")
                q_col = gr.Number(label="Patch column (0-based)", precision=0, elem_id="attn-q-col")
    query_img = gr.Image(label="Clicked patch: attention in the chosen layer", format=VIEW_FORMAT,
                         interactive=False, elem_id="attn-query")
    query_strip = gr.Image(label="Clicked patch: attention in every layer", format=VIEW_FORMAT,
                           interactive=False, elem_id="attn-query-strip")
    heads = gr.Image(label=labels["heads"],
                     format=VIEW_FORMAT, interactive=False, elem_id="attn-heads")
    strip = gr.Image(label=labels["strip"], format=VIEW_FORMAT,
                     interactive=False, elem_id="attn-strip")
    with gr.Row():
        rollout = gr.Image(label=labels["rollout"], format=VIEW_FORMAT,
                           interactive=False, elem_id="attn-rollout")
        with gr.Column():
            relevance = gr.Image(label="Class-specific relevance", format=VIEW_FORMAT,
                                 interactive=False, elem_id="attn-relevance")
            relevance_note = gr.Markdown()
    masks = gr.Image(label="DINO-style masks per head", format=VIEW_FORMAT, interactive=False,
                     elem_id="attn-masks")
    with gr.Row():
        prefix_plot = gr.Plot(label="Prefix tokens", elem_id="attn-prefix")
        with gr.Column():
            norm_map = gr.Image(label="Token norms (high-norm tokens boxed)", format=VIEW_FORMAT,
                                interactive=False, elem_id="attn-norms")
            norm_note = gr.Markdown(elem_id="attn-norm-note")
    norm_plot = gr.Plot(label="Token norm distribution", elem_id="attn-norm-hist")
    gr.Markdown(NORM_NOTE)

    settings = [layer, fusion, roll_fusion, discard, start, keep, opacity, cmap]
    views = [heads, strip, rollout, masks, prefix_plot, norm_map, norm_plot, norm_note,
             relevance, relevance_note]
    controls = [layer, start, query_head, heads, strip, rollout]
    model.change(model_controls, inputs=model, outputs=controls, api_name="attention_geometry",
                 concurrency_limit=common.concurrency_limit(), concurrency_id="analysis",
                 show_progress="hidden")
    run.click(analyse_and_render, inputs=[image, model, width, height, fit, *settings, query_head],
              outputs=[session, summary, shown, *views, *controls, query_img, query_strip,
                       query_info],
              api_name="attention", concurrency_limit=common.concurrency_limit(),
              concurrency_id="analysis")
    gr.on([layer.release, fusion.change, roll_fusion.change, discard.release, start.release,
           keep.release, opacity.release, cmap.change],
          rerender, inputs=[session, *settings], outputs=views, api_name="attention_views",
          trigger_mode="always_last", **common.views_queue())
    query_inputs = [session, q_row, q_col, layer, query_head, opacity, cmap]
    shown.select(pick_patch, inputs=session, outputs=[q_row, q_col],
                 api_name="attention_pick", **common.views_queue()).then(
        query, inputs=query_inputs, outputs=[query_img, query_strip, query_info],
        api_name="attention_query", **common.views_queue())
    gr.on([query_head.change, layer.release], query_if_picked, inputs=query_inputs,
          outputs=[query_img, query_strip, query_info], api_name="attention_query_update",
          trigger_mode="always_last", **common.views_queue())
    return TabLink("attention", image, model, width, height, run_id="attn-run",
                   extra={"layer": layer, "fusion": fusion, "head": query_head})


def query_if_picked(session, row, col, layer, head, opacity, cmap):
    """Refresh the query views after a layer/head change, if a patch was picked."""
    if session is None or row is None or col is None:
        return gr.skip(), gr.skip(), gr.skip()
    return query(session, row, col, layer, head, opacity, cmap)


NORM_NOTE = """
*Token norms.* Darcet et al. (2024, "Vision Transformers Need Registers") found that large
DINOv2 models without registers repurpose a few low-information background patches as
global scratch space: those tokens get norms several times the others and draw the class
token's attention, which spoils attention maps. Register tokens give the model that space
instead. The detector here boxes patches above 2x the median patch norm of the image; the
small offline ViT-S/14 shows few or none (the paper reports the artifacts mostly from
ViT-L up), which the histogram lets you check.
"""
