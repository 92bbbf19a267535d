"""The lecture path as data, and the figures of the lecture's own (paper) numbers."""

from __future__ import annotations

import re

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
