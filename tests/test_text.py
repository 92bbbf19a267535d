"""Text drawn into images (`explorer.plots.text`, `explorer.plots.colors.mosaic`): a real
font whose glyphs exist, captions that stay inside their tile and the canvas, token indices
inside their patch."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFont

from explorer.plots import colors, text
from explorer.plots import tokens as token_plots
from explorer.plots.finetune import misclassified_grid

# What the app writes into pictures, with the characters that Pillow's own font lacks.
CAPTIONS = ["T-shirt/top → Ankle boot", "Coat → Trouser", "24-bit colour (16.7 M words)",
            "9-bit colour (512 words)", "features.17: 53 px", "L12 head 6", "Layer 12",
            "h3: 41%", "PC12", "0:CLS", "1368", "rollout, sinks masked", "3×3 · 14 px"]


def test_the_font_is_dejavu_from_a_file_here_and_draws_every_caption():
    path = text.font_path()
    assert path is not None and path.name == "DejaVuSans.ttf" and path.is_file()
    assert text.font(14).getname()[0] == "DejaVu Sans"
    for caption in CAPTIONS:
        assert text.missing_glyphs(caption) == set(), caption


def test_missing_glyphs_finds_the_box_pillow_s_default_font_draws():
    # the bug this module fixes: Pillow's default font has no arrow ("Coat ▯ Trouser")
    pillow = ImageFont.load_default(size=14)
    assert text.missing_glyphs("Coat → Trouser", pillow) == {"→"}
    assert text.missing_glyphs("Coat → Trouser") == set()


@pytest.mark.parametrize("width", [30, 60, 92, 150])
def test_a_fitted_caption_is_never_wider_than_its_width(width):
    for caption in CAPTIONS:
        fitted = text.fit_caption(caption, width, 16, min_size=8, max_lines=2)
        assert 1 <= len(fitted.lines) <= 2
        for line in fitted.lines:
            assert text.text_width(line, fitted.font) <= width, (caption, fitted)
        if fitted.size > 8:  # not cut: every word is there
            assert " ".join(fitted.lines) == caption


def test_a_caption_that_fits_keeps_its_size_and_wraps_at_spaces():
    fitted = text.fit_caption("T-shirt/top → Ankle boot", 92, 13)
    assert fitted == text.Caption(13, ("T-shirt/top →", "Ankle boot"))
    assert text.fit_caption("PC1", 92, 13) == text.Caption(13, ("PC1",))


def _ink_columns(band: np.ndarray) -> np.ndarray:
    """Columns of a caption band holding dark (text) pixels."""
    return np.flatnonzero((band < 128).any(axis=(0, 2)))


@pytest.mark.parametrize("tile,labels", [
    (96, ["T-shirt/top → Ankle boot", "Coat → Trouser", "Sneaker → Sandal"]),
    (56, ["PC1", "PC2", "PC12"]),
    (160, ["24-bit colour (16.7 M words)", "9-bit colour (512 words)"]),
    (24, ["1366", "1367", "1368"]),
])
def test_mosaic_captions_stay_under_their_own_tile(tile, labels):
    tiles = [np.full((tile, tile, 3), 200, np.uint8) for _ in labels]
    gap = 3
    out = colors.mosaic(tiles, cols=len(tiles), gap=gap, labels=labels)
    captions, label_h = colors.caption_layout(labels, tile, tile)
    assert out.shape == (gap + tile + label_h + gap, len(tiles) * (tile + gap) + gap, 3)
    band = out[gap + tile: gap + tile + label_h]
    for i, caption in enumerate(captions):
        x0 = gap + i * (tile + gap)
        ink = _ink_columns(band[:, x0: x0 + tile])
        assert ink.size, labels[i]  # the caption is drawn ...
        # ... inside its tile's columns: nothing in the gaps beside it
        assert not (band[:, x0 - gap: x0] < 128).any()
        assert not (band[:, x0 + tile: x0 + tile + gap] < 128).any()
        assert caption.height + 2 * colors.CAPTION_PAD <= label_h
        for line in caption.lines:
            assert text.text_width(line, caption.font) <= tile - 2
    assert not (out[-gap:] < 128).any()  # nothing below the band: no caption cut at the bottom


def test_misclassified_strip_writes_whole_class_names_with_an_arrow():
    from explorer.datasets import ImageSet

    names = ["T-shirt/top", "Ankle boot", "Coat", "Trouser"]
    val = ImageSet(names, np.array([0, 2]), np.zeros((2, 28, 28), np.uint8))
    grid = misclassified_grid(val, val.labels, np.array([1, 3]), tile=96)
    captions, label_h = colors.caption_layout(["T-shirt/top → Ankle boot", "Coat → Trouser"],
                                              96, 96, max_lines=3)
    assert [" ".join(c.lines) for c in captions] == ["T-shirt/top → Ankle boot", "Coat → Trouser"]
    assert grid.shape[0] == 3 + 96 + label_h + 3


@pytest.mark.parametrize("size,patch,prefix", [((224, 224), (14, 14), 1), ((518, 518), (14, 14), 5),
                                               ((64, 96), (16, 16), 2)])
def test_token_indices_stay_inside_their_patch(size, patch, prefix):
    image = np.zeros((*size, 3), np.uint8)
    out = token_plots.grid_overlay(image, patch, first_index=prefix)
    scale = out.shape[0] // size[0]
    ph, pw = patch[0] * scale, patch[1] * scale
    # grid lines are drawn first, then the indices: an index running over its patch would
    # paint its yellow or black outline over a white grid line
    rows, cols = size[0] // patch[0], size[1] // patch[1]
    for r in range(rows):
        assert (out[r * ph, : cols * pw] == 255).all(), r
    for c in range(cols):
        assert (out[: rows * ph, c * pw] == 255).all(), c
    yellow = (out[..., 0] > 200) & (out[..., 1] > 200) & (out[..., 2] < 80)
    assert yellow[:ph, :pw].any() and yellow[-ph:, -pw:].any()  # first and last index drawn


def test_pillow_default_is_only_a_fallback(monkeypatch):
    monkeypatch.setattr(text, "font_path", lambda: None)  # no DejaVu anywhere
    text.font.cache_clear()
    try:
        fallback = text.font(12)
        assert fallback.getname()[0] != "DejaVu Sans" and fallback.getbbox("Layer 1")[2] > 0
    finally:
        monkeypatch.undo()
        text.font.cache_clear()
    assert text.font(12).getname()[0] == "DejaVu Sans"


def test_a_drawn_caption_has_no_box_glyph():
    # the misclassified strip's arrow drawn in our font differs from the missing-glyph box
    f = text.font(16)
    arrow = np.asarray(Image.frombytes("L", f.getmask("→").size, bytes(f.getmask("→"))))
    box = np.asarray(Image.frombytes("L", f.getmask("\ue000").size, bytes(f.getmask("\ue000"))))
    assert arrow.shape != box.shape or (arrow != box).any()


def test_token_sequence_labels_are_never_cut():
    # DINOv2 with registers at 518 px: 5 prefix tokens and 1,369 patches under 24 px tiles
    prefix = ["CLS", "REG1", "REG2", "REG3", "REG4"]
    image = np.zeros((518, 518, 3), np.uint8)
    out = token_plots.token_sequence(image, (14, 14), prefix)
    labels = [f"{i} {n}" for i, n in enumerate(prefix)] + [str(i) for i in range(5, 5 + 37 * 37)]
    captions, label_h = colors.caption_layout(labels, 24, 24)
    assert not any(text.ELLIPSIS in line for c in captions for line in c.lines)
    assert [c.lines for c in captions[:2]] == [("0", "CLS"), ("1", "REG1")]
    rows = -(-len(labels) // 37)
    assert out.shape[0] == rows * (24 + 3 + label_h) + 3
