"""Attention tab: every layer and head, rollout, a clicked query patch, prefix tokens."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, fields

import gradio as gr
import torch

from explorer import attention, gpu, images, models, patches
from explorer.plots import attention as plots
from explorer.plots.colors import COLORMAPS
from explorer.store import Ref
from explorer.ui import attention_view, common, links
from explorer.ui.attention_view import (
    HEAD_FUSIONS,
    SINK_VIEWS,
    Analysis,
    head_choices,
    parse_head,
)
from explorer.ui.outputs import Outputs
from explorer.ui.presenter import TabLink

INTRO = """
**Where does each token look?** Every block mixes tokens with softmax(QKᵀ/√d): one map per
head. Below: the class token's attention in a chosen layer for every head, the same for all
layers at a glance, *rollout* (attention chained through the layers with the residual
connection counted as identity, Abnar & Zuidema 2020), DINO-style masks, and the prefix
tokens. **Click a patch** on the input to see what that patch attends to.
"""

# Views are photos under colour maps: JPEG encodes them far faster than PNG, which was most of
# a re-render's server time (BENCHMARKS.md, "Serving a lecture hall").
VIEW_FORMAT = "jpeg"


@dataclass(frozen=True)
class ViewSettings:
    """The settings the views are drawn with, converted from the UI's values in one place."""

    layer: int  # 1-based, as the slider shows it
    fusion: str
    roll_fusion: str
    discard: float
    start: int  # 1-based
    keep: float
    opacity: float
    cmap: str
    sinks: str = SINK_VIEWS[0]  # attention sinks "as they are" or "masked"

    @classmethod
    def from_ui(cls, layer, fusion, roll_fusion, discard, start, keep, opacity, cmap,
                sinks=SINK_VIEWS[0]):
        if sinks not in SINK_VIEWS:
            raise gr.Error(f"Attention sinks: one of {', '.join(SINK_VIEWS)}, not {sinks!r}.")
        return cls(int(layer), fusion, roll_fusion, float(discard), int(start), float(keep),
                   float(opacity), cmap, sinks)

    def changed(self, other: ViewSettings) -> set[str]:
        """Names of the settings that differ from ``other``'s."""
        return {f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)}


# The views, in the order the API returns them, and the settings each depends on: a re-render
# sends only the views whose settings changed.
DEPENDS = {
    "heads": {"layer", "fusion", "opacity", "cmap", "sinks"},
    "strip": {"fusion", "opacity", "cmap", "sinks"},
    "rollout": {"roll_fusion", "discard", "start", "opacity", "cmap", "sinks"},
    "masks": {"layer", "keep", "sinks"},
    "prefix_plot": set(),
    "norm_map": {"layer", "cmap"},
    "norm_plot": {"layer"},
    "norm_note": {"layer"},
    "relevance": {"opacity", "cmap"},
    "relevance_note": set(),
    "sink_note": {"roll_fusion", "discard", "start", "sinks"},
}
VIEWS = tuple(DEPENDS)
CAPTIONS = ("heads_caption", "strip_caption", "rollout_caption")  # name the model's source token
CONTROLS = ("layer", "start", "query_head", *CAPTIONS)  # follow the model
QUERY = ("query_img", "query_strip", "query_info")  # a clicked patch's views
CLICK_A_PATCH = "Click a patch on the input image."


def view_labels(geometry: patches.ModelGeometry) -> dict[str, str]:
    """Captions of the views whose source token depends on the model (`CAPTIONS`): its class
    token, if it has one, else what the patches receive on average
    (`explorer.patches.has_class_token`)."""
    source = "Class token" if geometry.class_token else "Mean over patch queries"
    return {"heads_caption": f"{source} → patches, every head of the chosen layer, and fused",
            "strip_caption": f"{source} → patches, every layer (fused)",
            "rollout_caption": f"Attention rollout ({source.lower()})"}


def geometry_updates(geometry: patches.ModelGeometry | None, layer=None, start=None,
                     head=None) -> dict:
    """Control updates for a model (`CONTROLS`): layer and start sliders, head choices, view
    labels. Keeps a chosen value that still fits the model (layer default: the last; start:
    the first); ``None`` (no model) changes nothing.
    """
    if geometry is None:
        return {}
    depth, choices = geometry.depth, head_choices(geometry.num_heads)
    return {"layer": gr.Slider(maximum=depth, value=min(int(layer or depth), depth)),
            "start": gr.Slider(maximum=depth, value=min(int(start or 1), depth)),
            "query_head": gr.Dropdown(choices=choices, value=head if head in choices else "mean"),
            **view_labels(geometry)}


def model_controls(model_name) -> dict:
    """Controls for a newly picked model (`/attention_geometry`): its last layer, rollout from
    its first, its heads (query map back to "mean"), and view labels for its tokens."""
    return geometry_updates(common.model_geometry(model_name))


def _analyse(request: common.ImageRequest) -> Analysis:
    model, data_config, pixels = common.model_and_pixels(
        request.image, request.model, request.width, request.height, request.fit)
    with common.user_errors():
        # kept in the store: float16 q, k and head means (half the bytes), cast per block
        # on a ZeroGPU Space each runs in a GPU call (`explorer.gpu`); elsewhere a plain call
        # (on CUDA, concurrent requests for one model and size share one forward)
        maps = gpu.analyse_on_device(attention.shared_capture, model, pixels,
                                     keep_dtype=torch.float16)
        relevance, note = None, "Class-specific map: only for models with a classifier head."
        if getattr(model, "num_classes", 0):
            rel, target = gpu.analyse_on_device(attention.class_relevance, model, pixels)
            names = getattr(model, "class_names", None)
            label = names[int(target[0])] if names else f"class {int(target[0])}"
            relevance, note = rel[0], f"Relevance for the predicted **{label}** (Chefer et al.)."
    share = attention.prefix_attention_share(maps)[:, 0]
    rows, cols = maps.grid
    size = tuple(pixels.shape[-2:])
    summary = (f"**{models.describe(request.model)}** {size[1]}x{size[0]} px, {cols}x{rows} "
               f"patches, {maps.num_layers} layers x {maps.num_heads} heads, prefix: "
               f"{', '.join(maps.prefix_names) or 'none'}.")
    return Analysis(maps, patches.model_geometry(model, data_config),
                    images.pixels_to_image(pixels, data_config), share, relevance, note, summary,
                    sinks=attention_view.layer_sinks(maps))


def kept(ref: Ref | None) -> Analysis:
    """The session's analysis; after the store dropped it, analysed again from the inputs in
    its ref (or, if that upload is gone, a message saying to press the button)."""
    if ref is None:
        raise gr.Error("Run the analysis first (press Show attention).")
    try:
        return common.session().kept(ref, _analyse)
    except gr.Error as err:
        raise gr.Error("This analysis was dropped from the server's memory and cannot be "
                       "redone: press Show attention again.") from err


def render(analysis: Analysis, s: ViewSettings, only: set[str] | None = None) -> dict:
    """The per-image views (`VIEWS`) of an analysis; ``only``: just those."""
    maps, shown = analysis.maps, analysis.shown
    sinks = analysis.sinks or []
    masked = s.sinks == "masked"
    found = attention_view.sink_tokens(sinks)
    tokens, other = (found, []) if masked else ([], found)
    with common.user_errors(), _index_errors():
        v = attention_view.attention_views(maps, min(s.layer - 1, maps.num_layers - 1), s.fusion,
                                           s.roll_fusion, s.discard, s.start - 1, s.keep,
                                           prefix_share=analysis.prefix_share, masked=tokens)
    relevance = analysis.relevance
    draw = {
        "heads": lambda: plots.head_grid(shown, v.heads, v.fused, s.fusion, v.layer, s.opacity,
                                         s.cmap),
        "strip": lambda: plots.layer_strip(shown, v.per_layer, s.opacity, s.cmap),
        "rollout": lambda: plots.heat_overlay(shown, v.rollout, s.opacity, s.cmap),
        "masks": lambda: plots.mask_grid(shown, v.masks, s.keep, v.layer),
        "prefix_plot": lambda: plots.prefix_share_figure(v.prefix_share, maps.prefix_names),
        "norm_map": lambda: plots.token_norm_map(shown, v.norms[maps.num_prefix_tokens:],
                                                 maps.grid, v.high_norm, s.cmap),
        "norm_plot": lambda: plots.token_norm_figure(v.norms, maps.prefix_names,
                                                     v.norm_threshold, v.layer),
        "norm_note": lambda: (f"Block {v.layer + 1}: **{int(v.high_norm.sum())}** patch "
                              f"token(s) above {v.norm_threshold:.1f} (2x the median patch "
                              "norm)."),
        "relevance": lambda: (plots.heat_overlay(shown, relevance, s.opacity, s.cmap)
                              if relevance is not None else None),
        "relevance_note": lambda: analysis.relevance_note,
        "sink_note": lambda: attention_view.sink_view_note(
            sinks, maps.grid, maps.num_prefix_tokens, maps.num_tokens, v.rollout.cpu(),
            attention_view.rollout_map(  # the other choice, for comparison
                maps, other,
                head_fusion=s.roll_fusion, discard_ratio=s.discard,
                start_layer=s.start - 1).cpu(),
            masked, "class token" if maps.has_class_token else "patch queries' mean"),
    }
    return {name: draw[name]() for name in VIEWS if only is None or name in only}


def rerender(ref: Ref | None, layer, fusion, roll_fusion, discard, start, keep, opacity, cmap,
             sinks=SINK_VIEWS[0]):
    """Redraw the kept analysis after a setting changes (the `/attention_views` endpoint):
    only the views whose settings changed since the session's last drawing (`DEPENDS`; the
    others are left as shown); nothing to do before the first analysis."""
    if ref is None:
        return {}
    analysis = kept(ref)
    now = ViewSettings.from_ui(layer, fusion, roll_fusion, discard, start, keep, opacity, cmap,
                               sinks)
    before, analysis.drawn = analysis.drawn, now
    if before is None:  # first drawing of a rebuilt analysis: everything
        return render(analysis, now)
    changed = now.changed(before)
    return render(analysis, now, only={name for name, d in DEPENDS.items() if d & changed})


def analyse_and_render(image_path, model_name, width, height, fit, layer, fusion, roll_fusion,
                       discard, start, keep, opacity, cmap, head="mean", sinks=SINK_VIEWS[0],
                       request: gr.Request | None = None):
    """Analyse an image and build every view (the `/attention` endpoint).

    Also returns the controls fitted to the analysed model (`geometry_updates`), so the layer
    and head choices always match the maps shown, and the `Ref` of the kept analysis.
    """
    inputs = common.ImageRequest(image_path, model_name, width, height, fit)
    analysis = _analyse(inputs)
    ref = common.session(request).keep(analysis, inputs)
    depth = analysis.geometry.depth
    layer, start = min(int(layer or depth), depth), min(int(start or 1), depth)
    analysis.drawn = ViewSettings.from_ui(layer, fusion, roll_fusion, discard, start, keep,
                                          opacity, cmap, sinks)
    views = render(analysis, analysis.drawn)
    return {"session": ref, "summary": analysis.note, "shown": analysis.shown,
            **geometry_updates(analysis.geometry, layer, start, head), **views,
            "query_img": None, "query_strip": None, "query_info": CLICK_A_PATCH}


def pick_patch(ref: Ref | None, evt: gr.SelectData):
    """Turn a click on the input image into a (row, col) patch position."""
    if ref is None:
        raise gr.Error("Run the analysis first, then click a patch.")
    analysis = kept(ref)
    (ph, pw), (rows, cols) = analysis.maps.patch_size, analysis.maps.grid
    x, y = evt.index
    return min(int(y) // ph, rows - 1), min(int(x) // pw, cols - 1)


def query(ref: Ref | None, row, col, layer, head, opacity, cmap) -> dict:
    """One query patch's attention (`QUERY`): chosen layer and head, and across layers."""
    if ref is None or row is None or col is None:
        raise gr.Error("Run the analysis first, then click a patch.")
    analysis = kept(ref)
    maps, cell = analysis.maps, (int(row), int(col))
    with common.user_errors(), _index_errors():
        in_layer, all_layers = attention_view.query_views(maps, *cell, int(layer) - 1,
                                                          parse_head(head))
    info = (f"Query patch row {cell[0]}, column {cell[1]} (token {maps.token_index(*cell)}), "
            f"layer {int(layer)}, head: {head}.")
    return {"query_img": plots.heat_overlay(analysis.shown, in_layer, opacity, cmap, cell),
            "query_strip": plots.layer_strip(analysis.shown, all_layers, opacity, cmap, cell),
            "query_info": info}


def query_if_picked(ref: Ref | None, row, col, layer, head, opacity, cmap) -> dict:
    """Refresh the query views after a layer/head change, if a patch was picked."""
    if ref is None or row is None or col is None:
        return {}
    return query(ref, row, col, layer, head, opacity, cmap)


@contextlib.contextmanager
def _index_errors() -> Iterator[None]:
    """Out-of-range layer/head/patch (possible from the API) become a clear gr.Error."""
    try:
        yield
    except (IndexError, ValueError) as err:
        raise gr.Error(str(err)) from err


def build_attention_tab(ctx: common.TabContext) -> TabLink:
    """Components and events of the tab; call inside ``with gr.Tab(...)``.

    Returns:
        What a link to this tab sets (`explorer.ui.presenter`).
    """
    gr.Markdown(INTRO)
    session = gr.State(None)
    geometry = models.vit_geometry(None)  # the picker starts on the default model
    depth, labels = geometry.depth, view_labels(geometry)
    with gr.Row():
        with gr.Column(scale=1):
            image, model = common.image_and_model("attn", height=260)
            width, height, fit = common.resolution_inputs("attn")
            run = gr.Button("Show attention", variant="primary", elem_id="attn-run",
                            interactive=False)  # until an image is there
        with gr.Column(scale=1):
            # Layer, start and head limits come from the model: the default's at first, then
            # `model_controls` on every model change and `analyse_and_render` with each run.
            layer = gr.Slider(1, max(depth, 2), value=depth, step=1, label="Layer",
                              elem_id="attn-layer",
                              info="1 = first block; the maximum is the model's depth")
            fusion = gr.Radio(list(HEAD_FUSIONS), value="mean", label="Fuse heads by")
            sinks = gr.Radio(list(SINK_VIEWS), value=SINK_VIEWS[0], label="Attention sinks",
                             elem_id="attn-sinks",
                             info="patches that take an outsized share of every token's "
                                  "attention; masked: taken out of the class-token maps and "
                                  "rollout, the rest renormalised")
            with gr.Accordion("Rollout", open=True):
                roll_fusion = gr.Radio(list(HEAD_FUSIONS), value="mean",
                                       label="Rollout head fusion")
                discard = gr.Slider(0, 0.95, value=0.0, step=0.05, label="Discard ratio",
                                    info="share of the weakest links dropped per layer")
                start = gr.Slider(1, max(depth, 2), value=1, step=1, label="Start layer",
                                  elem_id="attn-start")
            keep = gr.Slider(0.1, 1.0, value=0.6, step=0.05, label="DINO mask: attention mass kept")
            with gr.Row():
                opacity = gr.Slider(0, 1, value=0.6, step=0.05, label="Overlay opacity")
                cmap = gr.Dropdown(COLORMAPS, value="inferno", label="Colour map")
        with gr.Column(scale=1):
            message = common.message_box("attn")
            summary = gr.Markdown(elem_id="attn-summary")
            _, shown = common.figure("Input as the model sees it: **click a patch**",
                                     "attn-input", format=VIEW_FORMAT)
            query_info = gr.Markdown(CLICK_A_PATCH, elem_id="attn-query-info")
            query_head = gr.Dropdown(head_choices(geometry.num_heads), value="mean",
                                     label="Query map: head",
                                     elem_id="attn-query-head")
            with gr.Row():
                q_row = gr.Number(label="Patch row (0-based)", precision=0, elem_id="attn-q-row")
                q_col = gr.Number(label="Patch column (0-based)", precision=0, elem_id="attn-q-col")
    _, query_img = common.figure("Clicked patch: attention in the chosen layer", "attn-query",
                                 format=VIEW_FORMAT)
    _, query_strip = common.figure("Clicked patch: attention in every layer",
                                   "attn-query-strip", format=VIEW_FORMAT)
    heads_caption, heads = common.figure(labels["heads_caption"], "attn-heads", format=VIEW_FORMAT)
    strip_caption, strip = common.figure(labels["strip_caption"], "attn-strip", format=VIEW_FORMAT)
    with gr.Row():
        with gr.Column():
            rollout_caption, rollout = common.figure(labels["rollout_caption"], "attn-rollout",
                                                     format=VIEW_FORMAT)
            sink_note = gr.Markdown(elem_id="attn-sink-note")
        with gr.Column():
            _, relevance = common.figure("Class-specific relevance", "attn-relevance",
                                         format=VIEW_FORMAT)
            relevance_note = gr.Markdown()
    _, masks = common.figure("DINO-style masks per head", "attn-masks", format=VIEW_FORMAT)
    with gr.Row():
        prefix_plot = gr.Plot(label="Prefix tokens", elem_id="attn-prefix")
        with gr.Column():
            _, norm_map = common.figure("Token norms (high-norm tokens boxed)", "attn-norms",
                                        format=VIEW_FORMAT)
            norm_note = gr.Markdown(elem_id="attn-norm-note")
    norm_plot = gr.Plot(label="Token norm distribution", elem_id="attn-norm-hist")
    gr.Markdown(NORM_NOTE)

    out = Outputs(session=session, summary=summary, shown=shown, heads=heads,
                  strip=strip, rollout=rollout, masks=masks, prefix_plot=prefix_plot,
                  norm_map=norm_map, norm_plot=norm_plot, norm_note=norm_note,
                  relevance=relevance, relevance_note=relevance_note, layer=layer, start=start,
                  query_head=query_head, query_img=query_img, query_strip=query_strip,
                  query_info=query_info, sink_note=sink_note, heads_caption=heads_caption,
                  strip_caption=strip_caption, rollout_caption=rollout_caption,
                  message=message)  # last: the API's outputs keep their order
    # failures are said in the message box (its progress too), never over the controls
    shown_in = {"show_progress_on": [message]}
    settings = [layer, fusion, roll_fusion, discard, start, keep, opacity, cmap]  # ViewSettings
    common.enable_with_image(image, run)
    model.change(**out.event(model_controls, *CONTROLS), inputs=model,
                 api_name="attention_geometry", show_progress="hidden", **ctx.views())
    analysed = run.click(**out.event(common.reported(analyse_and_render, "attn")),
                         inputs=[image, model, width, height, fit, *settings, query_head, sinks],
                         validator=common.validator("image", "model", *[None] * 13),
                         api_name="attention", **shown_in, **ctx.analysis())
    redrawn = gr.on([layer.release, fusion.change, roll_fusion.change, discard.release,
                     start.release, keep.release, opacity.release, cmap.change, sinks.change],
                    **out.event(common.reported(rerender, "attn", clear=False), *VIEWS),
                    inputs=[session, *settings, sinks], api_name="attention_views",
                    trigger_mode="always_last", **shown_in, **ctx.views())
    query_inputs = [session, q_row, q_col, layer, query_head, opacity, cmap]
    picked = shown.select(common.reported(pick_patch, "attn", clear=False), inputs=session,
                          outputs=[q_row, q_col], api_name="attention_pick", **shown_in,
                          **ctx.views())
    queried = picked.success(
        **out.event(common.reported(query, "attn", clear=False), *QUERY), inputs=query_inputs,
        api_name="attention_query", **shown_in, **ctx.views())
    updated = gr.on([query_head.change, layer.release],
                    **out.event(common.reported(query_if_picked, "attn", clear=False), *QUERY),
                    inputs=query_inputs, api_name="attention_query_update",
                    trigger_mode="always_last", **shown_in, **ctx.views())
    for event in (analysed, redrawn, picked, queried, updated):
        common.on_failure(event, "attn", message)
    return TabLink(links.ATTENTION, image, model, width, height, run_id="attn-run",
                   extra={"layer": layer, "fusion": fusion, "head": query_head, "sinks": sinks})


NORM_NOTE = """
*Token norms.* Darcet et al. (2024, "Vision Transformers Need Registers") found that large
DINOv2 models without registers repurpose a few low-information background patches as
global scratch space: those tokens get norms several times the others and draw the class
token's attention, which spoils attention maps. Register tokens give the model that space
instead. The detector here boxes patches above 2x the median patch norm of the image; the
small offline ViT-S/14 shows few or none (the paper reports the artifacts mostly from
ViT-L up), which the histogram lets you check.
"""
