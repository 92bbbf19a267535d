"""The lecture path as data, and the figures of the lecture's own (paper) numbers."""

from __future__ import annotations

import re

import pytest

from explorer import lecture
from explorer.plots import lecture as lecture_plots
from explorer.ui.links import TAB_KEYS

OUTLINE = ["Text tokens", "Pixels as words", "Patches", "Position embeddings", "Attention",
           "global receptive field", "Inductive bias", "Scaling", "CoAtNet"]


def test_steps_follow_the_lectures_outline_in_order():
    assert len(lecture.STEPS) == len(OUTLINE)
    for step, words in zip(lecture.STEPS, OUTLINE, strict=True):
        assert words.lower() in step.title.lower()


def test_every_step_has_a_short_text_a_figure_and_a_tab():
    from explorer.ui.lecture_tab import FIGURES

    for step in lecture.STEPS:
        sentences = len(re.findall(r"[.!?](\s|$)", step.text))
        assert 2 <= sentences <= 5, step.title
        assert step.figure in FIGURES and step.tab in TAB_KEYS
        assert re.fullmatch(r"[a-z0-9-]+", step.caption)  # a file name as it stands


def test_paper_steps_say_the_numbers_are_the_papers():
    for step in lecture.STEPS:
        if step.figure.startswith("paper-"):
            assert "paper" in step.text.lower() and "not measured here" in step.text
    for fig in (lecture_plots.paper_data_figure(), lecture_plots.paper_scaling_figure()):
        assert "Paper numbers, not measured here" in fig.layout.title.text
        # the source on a line of its own, short enough for a half-width figure
        assert all(len(line) <= 90 for line in fig.layout.title.text.split("<br>"))


def test_the_paper_scaling_points_carry_the_papers_numbers_with_labels_that_stay_inside():
    fig = lecture_plots.paper_scaling_figure()
    points = [(x, y, pos) for t in fig.data for x, y, pos in zip(t.x, t.y, t.textposition,
                                                                  strict=True)]
    assert sorted((x, y) for x, y, _ in points) == sorted(
        (days, acc) for _, _, acc, days in lecture.PAPER_IMAGENET)
    left, right = min(points), max(points)
    assert left[2].endswith("right") and right[2].endswith("left")  # labels grow inwards


def test_projector_fonts_are_at_least_18px():
    fig = lecture_plots.for_projector(lecture_plots.paper_scaling_figure(), presenter=True)
    assert fig.layout.font.size >= 18 and fig.layout.legend.font.size >= 18
    assert all(t.textfont.size >= 18 for t in fig.data)
    plain = lecture_plots.paper_scaling_figure()
    assert lecture_plots.for_projector(plain, presenter=False).layout.font.size is None


def test_lecture_numbers_match_the_slides():
    # "Nice results!" slide: ViT-L/16 on JFT 87.76 at 0.68k TPUv3-core-days, on I21k 85.30.
    rows = {(m, d): (acc, days) for m, d, acc, days in lecture.PAPER_IMAGENET}
    assert rows[("ViT-L/16", "JFT-300M")] == (87.76, 680)
    assert rows[("ViT-L/16", "ImageNet-21k")] == (85.30, 230)


# --- the notes about a figure, from hand-built data -------------------------------------

def test_patch_note_counts_tokens_from_size_and_patch():
    note = lecture.patch_note((224, 224), (14, 14))
    assert "**256 tokens of 14×14 px** (16×16 patches)" in note and "50,176 pixel tokens" in note
    assert "196 tokens at this size" in note  # what the title's 16 px patches would give
    paper = lecture.patch_note((224, 224), (16, 16))
    assert "**196 tokens of 16×16 px**" in paper and "title" not in paper
    wide = lecture.patch_note((224, 448), (14, 14))  # (height, width): 16 rows, 32 columns
    assert "448×224 px image becomes **512 tokens" in wide and "(16×32 patches)" in wide


def test_sequence_note_counts_prefix_tokens():
    note = lecture.sequence_note((16, 32), ["CLS", "REG1", "REG2"])
    assert "16×32 = **512 patch tokens**" in note and "3 prefix tokens (CLS, REG1, REG2)" in note
    assert "**515 tokens** in all" in note
    assert "prefix" not in lecture.sequence_note((2, 2), [])


def test_position_facts_average_neighbours_lines_and_the_rest():
    # 3x3 grid, similarity 1 to 4-neighbours, 0.5 along the row / column, 0 elsewhere
    import numpy as np

    rows = cols = 3
    sim = np.zeros((rows, cols, rows, cols))
    for r in range(rows):
        for c in range(cols):
            for r2 in range(rows):
                for c2 in range(cols):
                    d = abs(r - r2) + abs(c - c2)
                    sim[r, c, r2, c2] = 2.0 if d == 0 else 1.0 if d == 1 else (
                        0.5 if r == r2 or c == c2 else 0.0)
    facts = lecture.position_facts(sim)
    assert (facts.neighbour, facts.line, facts.other) == (1.0, 0.5, 0.0)
    assert "rows and columns" not in lecture.position_note((3, 3), (3, 3), facts)
    assert "Nearby patches, and then the patch's row and column, light up" in \
        lecture.position_note((3, 3), (3, 3), facts)
    assert "no interpolation" in lecture.position_note((3, 3), (3, 3), facts)
    assert "interpolated down to this image's 3×3" in lecture.position_note((5, 5), (3, 3), facts)
    flat = lecture.PositionFacts(0.1, 0.1, 0.2)
    assert "do not stand out" in lecture.position_note((3, 3), (3, 3), flat)


def test_rollout_note_calls_a_sink_peak_a_sink():
    import numpy as np

    from explorer.attention import Sink

    rollout = np.full((4, 4), 0.01)
    rollout[3, 3] = 0.5
    corner = 1 + 15  # one prefix token, then 16 patches row-major
    sinks = [[], [Sink(corner, 0.13, 0.04, 0.9)]]
    facts = lecture.rollout_facts(rollout, sinks, num_prefix_tokens=1, num_tokens=17)
    assert facts.peak == (3, 3) and facts.peak_share == 0.5
    assert facts.mean_share == pytest.approx(0.65 / 16)
    assert facts.top_tenth == pytest.approx(0.51 / 0.65)  # the top 2 of 16 patches
    assert facts.sink_block == 1
    note = lecture.rollout_note(facts, (4, 4))
    assert "row 4, column 4, the bottom-right corner" in note and "**attention sink**" in note
    assert "in block 2 the tokens put on average 13%" in note and "12×" in note  # 0.5/0.0406
    # with the masked map drawn on the right, the note says what each side shows
    masked_map = np.full((4, 4), 0.05)
    masked_map[1, 0] = 0.2  # 0.2 / mean (0.2 + 15 * 0.05) / 16 = 3.4
    masked = lecture.rollout_facts(masked_map, [], 1, 17)
    both = lecture.rollout_note(facts, (4, 4), masked, masked_tokens=2)
    assert both.startswith("Left, the brightest patch (at row 4, column 4")
    assert "Right, the same rollout with the 2 sink patches taken out" in both
    assert "brightest patch is at row 2, column 1, on the left edge, 3× the mean" in both
    # the same map without a sink at its peak: no sink is claimed
    plain = lecture.rollout_facts(rollout, [[Sink(1, 0.2, 0.1, 1.0)]], 1, 17)
    assert plain.sink is None and "sink" not in lecture.rollout_note(plain, (4, 4))


def test_distance_profile_names_the_trend_the_numbers_have():
    import numpy as np

    grows = np.array([[10.0, 30.0], [40.0, 60.0], [80.0, 100.0]])  # means 20, 50, 90
    p = lecture.distance_profile(grows, uniform=110.0)
    assert p.trend == "grows" and p.most_global == (2, 1, 100.0) and p.means == (20.0, 50.0, 90.0)
    note = lecture.distance_note(p)
    assert "grows with depth, from 20 px in block 1 to 90 px in block 3" in note
    assert "head 2 of block 3 at 100 px" in note and "110 px" in note
    falls = lecture.distance_profile(grows[::-1], 110.0)
    assert falls.trend == "falls" and "does not grow with depth" in lecture.distance_note(falls)
    # the astronaut's shape: most global in block 1, a dip in block 2, a partial recovery
    dip = np.array([[100.0], [40.0], [50.0], [60.0], [70.0]])
    p = lecture.distance_profile(dip, 117.0)
    assert (p.trend, p.highest, p.lowest, p.recovers) == ("mixed", 0, 1, True)
    note = lecture.distance_note(p)
    assert "highest in block 1 (100 px) and lowest in block 2 (40 px)" in note
    assert "grows again to 70 px in block 5 without returning to block 1's level" in note
    assert "does not simply grow with depth" in note


def test_mosaic_labels_fit_under_their_own_tile():
    # step 2's figure: two 256 px tiles whose labels are long for them
    import numpy as np

    from explorer.plots.colors import mosaic

    tiles = [np.full((256, 256, 3), 255, np.uint8)] * 2
    out = mosaic(tiles, cols=2, labels=["24-bit colour (16.7 M words)", "9-bit palette (512 words)"])
    band = out[2 + 256:].min(axis=2)  # the label row under the tiles, darkest channel
    inked = np.flatnonzero((band < 128).any(axis=0))
    assert inked.size  # the labels are drawn
    first, second = inked[inked < 2 + 256], inked[inked >= 2 + 256 + 2]
    assert first.size and second.size and not ((inked >= 258) & (inked < 260)).any()
    assert first.min() > 0 and second.max() < out.shape[1] - 1  # inside the figure


# --- presenter mode: the same words, the explanation folded ------------------------------

def test_fold_details_keeps_the_first_paragraph_and_folds_the_rest():
    note = "Here the peak is at row 2. It is 5× the mean.\n\nWhy: a sink. It parks attention."
    folded = lecture.fold_details(note)
    shown, hidden = folded.split("<details>")
    assert shown.strip() == "Here the peak is at row 2. It is 5× the mean."
    assert "Why: a sink. It parks attention." in hidden and hidden.rstrip().endswith("</details>")
    assert lecture.fold_details("One paragraph only.") == "One paragraph only."


def test_fold_details_cuts_a_long_paragraph_after_whole_sentences_within_the_budget():
    note = "First sentence (3 px). Second one is here. Third (the last)."
    folded = lecture.fold_details(note, budget=len("First sentence (3 px). Second one is here."))
    shown, hidden = folded.split("<details>")
    assert shown.strip() == "First sentence (3 px). Second one is here."
    assert "Third (the last)." in hidden
    # a budget smaller than the first sentence still shows that sentence
    assert lecture.fold_details(note, budget=5).startswith("First sentence (3 px).\n\n<details>")
    # list items are units too: a heading line stays, the items fold
    lines = "**Trained here:** best width:\n- 500 images: 64\n- 60,000 images: 128"
    shown, hidden = lecture.fold_details(lines, budget=40).split("<details>")
    assert shown.strip() == "**Trained here:** best width:" and "- 60,000 images: 128" in hidden


def test_rollout_note_leads_with_both_peaks_and_explains_the_sink_after():
    import numpy as np

    from explorer.attention import Sink

    rollout = np.full((4, 4), 0.01)
    rollout[3, 3] = 0.5
    sinks = [[Sink(1 + 15, 0.13, 0.04, 0.9)]]
    facts = lecture.rollout_facts(rollout, sinks, num_prefix_tokens=1, num_tokens=17)
    masked_map = np.full((4, 4), 0.05)
    masked_map[1, 0] = 0.2
    masked = lecture.rollout_facts(masked_map, [], 1, 17)
    lead, why = lecture.rollout_note(facts, (4, 4), masked, masked_tokens=2).split("\n\n")
    assert "**attention sink**" in lead and "Right, " in lead  # both maps' peaks first
    assert why.startswith("Why a sink: in block 1 the tokens put on average 13%")
    # the top 2 of 16 patches: (0.5 + 0.01) / 0.65 and (0.2 + 0.05) / 0.95
    assert "The brightest tenth of the patches hold 78% of the left map and 26% of the right" in why


def test_a_presenter_figure_fills_its_box_with_a_title_and_legend_that_fit():
    import plotly.graph_objects as go

    long = "Fashion-MNIST from scratch, trained here: test error vs training images"
    fig = go.Figure(go.Scatter(x=[1], y=[1], name="a"))
    fig.update_layout(title=long, height=460, legend={"orientation": "h", "y": -0.2})
    lecture_plots.for_projector(fig, presenter=True, fill=True)
    assert fig.layout.height is None  # the page's box decides
    first, second = fig.layout.title.text.split("<br>")
    assert first + second == long and first.endswith(" ") and abs(len(first) - len(second)) <= 12
    assert (fig.layout.legend.yref, fig.layout.legend.y) == ("container", 0)
    short = go.Figure(layout={"title": "Mean attention distance per head"})
    assert "<br>" not in lecture_plots.for_projector(short, True, fill=True).layout.title.text
    # half a tab's width (not filling): 600 px high, the title on two lines too, and room
    # above it for the block's label
    half = lecture_plots.for_projector(go.Figure(layout={"title": long, "height": 460}), True)
    assert half.layout.height == 600 and half.layout.title.text.replace("<br>", "") == long
    assert half.layout.margin.t == 120
    # a title with a subtitle: its first line is broken, the subtitle kept under it
    sub = go.Figure(layout={"title": long + "<br><sup>dotted: the original images</sup>"})
    first, second, subtitle = lecture_plots.for_projector(sub, True).layout.title.text.split("<br>")
    assert first + second == long and subtitle == "<sup>dotted: the original images</sup>"
