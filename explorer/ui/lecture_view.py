"""The Lecture's view model: each image step's figure and the sentence that describes it,
both made from the same data (no gradio here).

`explorer.lecture` holds the steps' words and the pure `*_note` functions; this module runs
the analyses of one bundled example at one size, draws each figure with `explorer.plots`
and hands the same data to the note, so the text says what the figure shows. The lab's
steps (7-9) are `explorer.ui.lab_view`'s. `explorer.ui.lecture_tab` turns a `Shown` into
components; the tests read `Shown.data` and the figure itself against the note.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from explorer import attention, distance, gpu, images, lecture, models, patches
from explorer.cache import KeyedCache
from explorer.igpt import pipeline
from explorer.plots import attention as attention_plots
from explorer.plots import colors
from explorer.plots import distance as distance_plots
from explorer.plots import tokens as token_plots
from explorer.ui import attention_view


@dataclass(frozen=True)
class Prepared:
    """One example at one size, ready for the figures (cached: stepping back is instant).

    Attributes:
        model, config: the offline default ViT and its data config.
        image: the example as opened (RGB).
        shown: (H, W, 3) the input as the model sees it.
        tokens: the tokenisation views' data (`explorer.patches.analyse_tokenization`).
        asked: the (height, width) asked for before snapping to the patch size.
    """

    model: torch.nn.Module
    config: dict
    image: Image.Image
    shown: np.ndarray
    tokens: patches.TokenizationResult
    asked: tuple[int, int]


@dataclass(frozen=True)
class Shown:
    """One step's figure and what its note was computed from.

    Attributes:
        figure: an (H, W, 3) image or a plotly figure.
        note: the sentences about this figure (Markdown).
        data: the values the note states, by name (what the tests check the figure against).
    """

    figure: object
    note: str
    data: dict


# Every bundled example at two sizes (each entry is small: the tokenisation views' tensors).
_PREPARED: KeyedCache[Prepared] = KeyedCache(max_items=8)


def example_path(example: str) -> Path:
    """The bundled example file called ``example`` (see `explorer.images.example_paths`)."""
    found = [p for p in images.example_paths() if p.stem == example]
    if not found:
        raise images.ImageError(f"No bundled example called {example!r}.")
    return found[0]


def prepared(example: str, size: int | None) -> Prepared:
    """The example ``example`` at ``size`` px square (None or 0: the model's default side),
    snapped to the patch size."""
    def build() -> Prepared:
        model, config = models.load_vit(None)
        geometry = patches.model_geometry(model, config)
        asked = (int(size), int(size)) if size else geometry.default_size
        side = tuple(images.snap_to_patch(s, p) for s, p in zip(asked, geometry.patch, strict=True))
        images.check_size(side, geometry.patch)
        image = images.open_image(example_path(example))
        pixels = images.prepare_pixels(image, config, side, "crop").to(patches.model_device(model))
        result = gpu.analyse_on_device(patches.analyse_tokenization, model, pixels)
        return Prepared(model, config, image, images.pixels_to_image(pixels, config), result, asked)

    return _PREPARED.get_or_build((models.DEFAULT_MODEL, example, size or None), build)


def overlay(presenter: bool) -> tuple[float, str]:
    """(opacity, colour map) of heat maps. Inferno spans black to pale yellow, the widest
    lightness range of the maps offered; a projector washes the photo out, so when
    presenting the map covers more of it."""
    return (0.8 if presenter else 0.6), "inferno"


def sequence(example: str, size: int | None, presenter: bool) -> Shown:
    """Step 1: the token sequence the model reads."""
    t = prepared(example, size).tokens
    # two image rows per line: a labelled tile is about twice as tall as wide, so lines of
    # one image row make a tall strip, drawn small beside the words on a wide screen
    figure = token_plots.token_sequence(prepared(example, size).shown, t.patch, t.prefix_names,
                                        per_row=2 * t.grid[1])
    return Shown(figure, lecture.sequence_note(t.grid, t.prefix_names),
                 {"grid": t.grid, "prefix": list(t.prefix_names)})


def rgb9(example: str, size: int | None, presenter: bool) -> Shown:
    """Step 2: the photo in 24-bit colour and in iGPT's 9-bit palette."""
    photo, photo9 = pipeline.in_rgb9(prepared(example, size).image)
    colours = len(np.unique(photo9.reshape(-1, 3), axis=0))
    figure = colors.mosaic([photo, photo9], cols=2, labels=["24-bit colour (16.7 M words)",
                                                            "9-bit palette (512 words)"])
    return Shown(figure, lecture.palette_note(photo9.shape[:2], colours),
                 {"photo9": photo9, "colours": colours})


def patch_grid(example: str, size: int | None, presenter: bool) -> Shown:
    """Step 3: the patch grid with each token's index."""
    p = prepared(example, size)
    figure = token_plots.grid_overlay(p.shown, p.tokens.patch, len(p.tokens.prefix_names))
    return Shown(figure, lecture.patch_note(p.tokens.size, p.tokens.patch),
                 {"size": p.tokens.size, "patch": p.tokens.patch, "grid": p.tokens.grid})


def positions(example: str, size: int | None, presenter: bool) -> Shown:
    """Step 4: position-embedding similarity tiles at this image's grid."""
    t = prepared(example, size).tokens
    facts = lecture.position_facts(t.pos_similarity.cpu())
    return Shown(token_plots.similarity_tiles(t.pos_similarity),
                 lecture.position_note(t.native_grid, t.grid, facts),
                 {"similarity": t.pos_similarity, "native_grid": t.native_grid, "facts": facts})


def rollout(example: str, size: int | None, presenter: bool) -> Shown:
    """Step 5: the class token's rollout over the image, with its attention sinks."""
    p = prepared(example, size)
    maps = gpu.analyse_on_device(attention.capture, p.model, p.tokens.pixels)
    views = attention_view.attention_views(maps, maps.num_layers - 1)
    sinks = attention_view.layer_sinks(maps)
    facts = lecture.rollout_facts(views.rollout.cpu(), sinks, maps.num_prefix_tokens,
                                  maps.num_tokens)
    shown = attention_plots.heat_overlay(p.shown, views.rollout, *overlay(presenter))
    tokens = attention_view.sink_tokens(sinks)
    if not tokens:
        return Shown(shown, lecture.rollout_note(facts, maps.grid),
                     {"rollout": views.rollout, "sinks": sinks, "facts": facts, "masked": None})
    # beside it, the same rollout with the sink patches taken out of every block's attention
    masked = attention_view.rollout_map(maps, tokens)
    masked_facts = lecture.rollout_facts(masked.cpu(), [], maps.num_prefix_tokens, maps.num_tokens)
    figure = colors.mosaic(
        [shown, attention_plots.heat_overlay(p.shown, masked, *overlay(presenter))], cols=2,
        labels=["rollout", "rollout, sinks masked"])
    return Shown(figure, lecture.rollout_note(facts, maps.grid, masked_facts, len(tokens)),
                 {"rollout": views.rollout, "sinks": sinks, "facts": facts, "masked": masked,
                  "masked_facts": masked_facts, "tokens": tokens})


def distance_view(example: str, size: int | None, presenter: bool) -> Shown:
    """Step 6: every head's mean attention distance against a CNN's receptive field."""
    p = prepared(example, size)
    series, _ = distance.compare_models(p.image, [(models.DEFAULT_MODEL, p.model, p.config,
                                                   p.tokens.size)])
    uniform = distance.uniform_distance(p.tokens.grid, p.tokens.patch)
    cnn = distance.mobilenet_receptive_fields(p.image, max(p.tokens.size))
    profile = lecture.distance_profile(series[0][1].cpu(), uniform)
    figure = distance_plots.distance_figure(series, None, cnn, uniform)
    return Shown(figure, lecture.distance_note(profile), {"profile": profile, "label": series[0][0]})


FIGURES = {"sequence": sequence, "rgb9": rgb9, "patches": patch_grid, "positions": positions,
           "rollout": rollout, "distance": distance_view}
