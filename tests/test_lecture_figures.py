"""Each Lecture step's words against its figure, for every bundled example, on the real
offline model: the numbers a step states are recomputed here from the model, the image and
the figure itself (not read back from the note's own inputs), so a step whose text and
figure disagree fails. Steps 7-9 are the lab's (`tests/test_lab_view.py`)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from explorer import attention, images, lecture, models, patches
from explorer.attention import SINK_FACTOR
from explorer.igpt import palette
from explorer.plots import attention as attention_plots
from explorer.ui import lecture_tab, lecture_view

EXAMPLES = [p.stem for p in images.example_paths()]
# every example at the model's default size, and one at another size (a bigger grid, the
# position embeddings interpolated to it, the sink in another place)
CASES = [(e, None) for e in EXAMPLES] + [("astronaut", 448)]
STEP = {s.figure: i + 1 for i, s in enumerate(lecture.STEPS)}


def shown_text(figure: str, example: str, size: int | None = None) -> str:
    """The Markdown the Lecture shows for the step of ``figure`` (the app's own callback)."""
    return lecture_tab.step_view(STEP[figure], example, size or 0, False)["text"]


def numbers(pattern: str, text: str) -> tuple[int, ...]:
    found = re.search(pattern, re.sub(r"(\d),(\d{3})", r"\1\2", text))  # 50,176 -> 50176
    assert found, f"{pattern!r} not in {text!r}"
    return tuple(int(g) for g in found.groups())


@pytest.fixture(scope="module")
def model():
    model, config = models.load_vit(None)
    geometry = patches.model_geometry(model, config)
    return model, config, geometry


@pytest.mark.parametrize(("example", "size"), CASES)
def test_step1_counts_the_tokens_of_the_model_and_size(model, example, size):
    m, config, geometry = model
    side = (size, size) if size else geometry.default_size
    rows, cols = (s // p for s, p in zip(side, geometry.patch, strict=True))
    prefix = int(m.num_prefix_tokens)
    text = shown_text("sequence", example, size)
    assert numbers(r"(\d+)×(\d+) = \*\*(\d+) patch tokens", text) == (rows, cols, rows * cols)
    assert numbers(r"\*\*(\d+) tokens\*\* in all", text) == (rows * cols + prefix,)


@pytest.mark.parametrize("example", EXAMPLES)
def test_step2_sizes_and_colours_are_the_photos(example):
    text = shown_text("rgb9", example)
    shown = lecture_view.rgb9(example, None, False)
    photo = images.open_image(lecture_view.example_path(example)).convert("RGB")
    photo.thumbnail((256, 256), Image.BOX)  # the figure's left half, as drawn
    w, h = photo.size
    colours = len(palette.rgb9_quantize(torch.from_numpy(np.asarray(photo).copy())).unique())
    assert numbers(r"(\d+)×(\d+) px: as pixel words it would be \*\*(\d+) tokens", text) == (
        w, h, w * h)
    assert numbers(r"uses (\d+) of the 512 colours", text) == (colours,)
    assert shown.figure.shape[0] >= h  # both halves of the figure are the photo's height


@pytest.mark.parametrize(("example", "size"), CASES)
def test_step3_patch_size_and_token_count_are_the_models(model, example, size):
    m, _, geometry = model
    ph, pw = (int(v) for v in m.patch_embed.patch_size)
    h, w = (size, size) if size else geometry.default_size
    text = shown_text("patches", example, size)
    assert numbers(r"a (\d+)×(\d+) px image becomes \*\*(\d+) tokens of (\d+)×(\d+) px", text) == (
        w, h, (h // ph) * (w // pw), pw, ph)
    assert "196 tokens of 16" not in text  # the lecture's ViT-B/16 count, not this model's
    grid = lecture_view.patch_grid(example, size, False).figure
    scale = grid.shape[0] // h  # drawn enlarged for the index labels
    assert scale >= 1 and grid.shape[:2] == (scale * h, scale * w)  # the image the tokens cut


@pytest.mark.parametrize(("example", "size"), CASES)
def test_step4_grids_and_ordering_are_the_similaritys(model, example, size):
    _, config, geometry = model
    native = tuple(s // p for s, p in zip(images.native_size(config), geometry.patch, strict=True))
    sim = lecture_view.positions(example, size, False).data["similarity"].cpu().numpy()
    rows, cols = sim.shape[:2]
    assert (rows, cols) == tuple(s // p for s, p in zip(
        (size, size) if size else geometry.default_size, geometry.patch, strict=True))
    text = shown_text("positions", example, size)
    assert numbers(r"trained on a (\d+)×(\d+) grid", text) == native
    assert numbers(r"to this image's (\d+)×(\d+) grid", text) == (rows, cols)
    near, line, other = [], [], []
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        for j in range(rows * cols):
            r2, c2 = divmod(j, cols)
            d = abs(r - r2) + abs(c - c2)
            if d == 1:
                near.append(sim[r, c, r2, c2])
            elif d > 1 and (r == r2 or c == c2):
                line.append(sim[r, c, r2, c2])
            elif d > 1:
                other.append(sim[r, c, r2, c2])
    said = [float(x) for x in re.findall(r"\d\.\d\d", text.split("mean similarity")[1])]
    assert said == pytest.approx([np.mean(near), np.mean(line), np.mean(other)], abs=0.006)
    claims = "row and column, light up" in text
    assert claims == (np.mean(near) > np.mean(other) and np.mean(line) > np.mean(other))


def class_rollout(maps, masked=()) -> np.ndarray:
    """The class token's rollout over the patches, by hand from every block's attention:
    e0 Â_{L-1} ... Â_0 with Â = rownorm(0.5 (A + I)), A the head mean with the ``masked``
    columns zeroed and its rows renormalised (float64)."""
    v = np.eye(maps.num_tokens)[0]
    for b in reversed(range(maps.num_layers)):
        a = maps.probs(b)[0].double().mean(0).numpy()
        a[:, list(masked)] = 0
        a /= a.sum(axis=1, keepdims=True)
        v = v @ (0.5 * (a + np.eye(len(a))))
    return v[maps.num_prefix_tokens:].reshape(maps.grid)


def said_peak(text: str) -> tuple[int, int]:
    return numbers(r"at row (\d+), column (\d+)", text)


@pytest.mark.parametrize(("example", "size"), CASES)
def test_step5_names_the_rollout_peak_and_the_sink_behind_it(example, size):
    p = lecture_view.prepared(example, size)
    shown = lecture_view.rollout(example, size, False)
    text = shown_text("rollout", example, size)
    maps = attention.capture(p.model, p.tokens.pixels)
    prefix, n, cols = maps.num_prefix_tokens, maps.num_tokens, maps.grid[1]
    rollout = class_rollout(maps)
    received = np.stack([maps.probs(b)[0].double().mean(0).mean(0).numpy()
                         for b in range(maps.num_layers)])  # (L, N) share each token receives
    sinks = sorted({int(t) for t in np.flatnonzero((received >= SINK_FACTOR / n).any(0))
                    if t >= prefix})
    # the figure: this rollout over the image, and (with sinks) the masked one beside it
    w = p.shown.shape[1]
    drawn = [attention_plots.heat_overlay(p.shown, rollout, *lecture_view.overlay(False))]
    if sinks:
        masked = class_rollout(maps, sinks)
        drawn.append(attention_plots.heat_overlay(p.shown, masked, *lecture_view.overlay(False)))
    for i, tile in enumerate(drawn):
        x = 2 + i * (w + 2) if sinks else 0  # the mosaic's tiles, 2 px apart
        y = 2 if sinks else 0
        got = shown.figure[y : y + tile.shape[0], x : x + w].astype(int)
        assert np.abs(got - tile.astype(int)).max() <= 3, i
    row, col = divmod(int(rollout.argmax()), cols)
    left = text.split("Right, ")[0]
    assert said_peak(left) == (row + 1, col + 1)
    peak = float(re.search(r"holds (\d+\.\d)% of the class token's rollout", text).group(1))
    assert peak == pytest.approx(100 * float(rollout.max()), abs=0.06)
    token = prefix + row * cols + col
    sink_blocks = np.flatnonzero(received[:, token] >= SINK_FACTOR / n)
    assert ("**attention sink**" in text) == bool(sink_blocks.size)
    if sink_blocks.size:
        (block,) = numbers(r"in block (\d+) the tokens put on average", text)
        assert block == sink_blocks[0] + 1
        share = int(re.search(r"on average (\d+)% of their attention", text).group(1))
        assert share == pytest.approx(100 * received[block - 1, token], abs=0.51)
    assert ("Right, " in text) == bool(sinks)
    if sinks:
        right = text.split("Right, ")[1]
        assert said_peak(right) == tuple(int(v) + 1 for v in divmod(int(masked.argmax()), cols))
        assert ("the sink patch" in right) == (len(sinks) == 1)


@pytest.mark.parametrize("example", EXAMPLES)
def test_step6_describes_the_plotted_profile(example):
    shown = lecture_view.distance_view(example, None, False)
    text = shown_text("distance", example)
    dots = next(t for t in shown.figure.data if t.mode == "markers" and t.name == shown.data["label"])
    layer_head = np.asarray(dots.customdata, dtype=int)
    d = np.zeros((layer_head[:, 0].max(), layer_head[:, 1].max()))
    d[layer_head[:, 0] - 1, layer_head[:, 1] - 1] = dots.y
    means = d.mean(axis=1)
    block, head = divmod(int(d.argmax()), d.shape[1])
    assert numbers(r"head (\d+) of block (\d+) at (\d+) px", text) == (
        head + 1, block + 1, round(d.max()))
    uniform = shown.figure.layout.shapes[0].y0  # the plotted uniform-attention line
    assert numbers(r"uniform attention over the whole image: (\d+) px", text) == (round(uniform),)
    rising = np.corrcoef(np.arange(len(means)), means)[0, 1] >= lecture.TREND_CORRELATION
    note = text.split("Here the most global head")[1]
    assert ("grows with depth, from" in note) == rising
    if not rising:
        assert numbers(r"highest in block (\d+) \((\d+) px\) and lowest in block (\d+) \((\d+) px\)",
                       note) == (int(means.argmax()) + 1, round(means.max()),
                                 int(means.argmin()) + 1, round(means.min()))
        assert "does not" in note


@pytest.mark.parametrize("step", range(1, 7))
def test_presenter_text_is_the_same_words_with_the_explanation_folded(step):
    """Presenter mode shows what fits beside the figure and folds the rest: the same computed
    sentences (nothing rewritten or dropped), the shown part within `PRESENTER_CHARS`."""
    plain = lecture_tab.step_view(step, "astronaut", 0, False)["text"]
    shown = lecture_tab.step_view(step, "astronaut", 0, True)["text"]
    visible = shown.split("<details>")[0]
    assert len(visible.strip()) <= lecture.PRESENTER_CHARS
    unfolded = re.sub(r"<details><summary>[^<]*</summary>|</details>", " ", shown)
    assert unfolded.split() == plain.split()
    if step == 5:  # the sink's explanation is a click away, both maps' peaks in view
        assert "Right, " in visible and "**attention sink**" in visible
        assert "Why a sink" not in visible and "Why a sink" in shown


def test_the_notes_follow_a_model_of_unusual_geometry():
    """Steps 1, 3, 4 and 6's words from the odd-shaped ViT (3 blocks of 5 heads, one register
    and no class token, trained at 64 px) on a 96×80 px input: every count is the model's."""
    from explorer import distance
    from tests.odd_vit import DEPTH, HEADS, PATCH, SIZE, odd_vit

    m = odd_vit()
    pixels = torch.randn(1, 3, 96, 80, generator=torch.Generator().manual_seed(0))
    t = patches.analyse_tokenization(m, pixels)
    assert t.prefix_names and "CLS" not in t.prefix_names and len(t.prefix_names) == 1
    assert lecture.sequence_note(t.grid, t.prefix_names) == (
        "Here the image is read as 6×5 = **30 patch tokens** in raster order after 1 prefix "
        f"token ({t.prefix_names[0]}): **31 tokens** in all.")
    assert lecture.patch_note(t.size, t.patch).startswith(
        f"Here a 80×96 px image becomes **30 tokens of {PATCH}×{PATCH} px** (6×5 patches)")
    native = SIZE // PATCH
    text = lecture.position_note(t.native_grid, t.grid, lecture.position_facts(
        t.pos_similarity.cpu().numpy()))
    assert text.startswith(f"Here the embeddings were trained on a {native}×{native} grid and "
                           "are interpolated up to this image's 6×5 grid.")
    d = distance.model_mean_attention_distance(m, pixels, "drop").numpy()
    assert d.shape == (DEPTH, HEADS)
    uniform = distance.uniform_distance(t.grid, t.patch)
    note = lecture.distance_note(lecture.distance_profile(d, uniform))
    block, head = divmod(int(d.argmax()), HEADS)
    assert note.startswith(f"Here the most global head is head {head + 1} of block {block + 1} "
                           f"at {d.max():.0f} px (uniform attention over the whole image: "
                           f"{uniform:.0f} px).")
    assert f"block {DEPTH + 1}" not in note and "block 12" not in note
