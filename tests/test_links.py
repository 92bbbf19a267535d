"""The link parser: query parameters -> a validated View, with hand-derived expectations."""

from __future__ import annotations

from urllib.parse import parse_qsl

import gradio as gr
import pytest

from explorer.ui.attention_view import SINK_VIEWS, head_choices, head_label, parse_head
from explorer.ui.links import (
    SINKS,
    TAB_KEYS,
    TABS,
    View,
    example_name,
    fit_geometry,
    head_choice,
    parse_view,
    sink_choice,
    sink_param,
    view_query,
)

EXAMPLES = ["astronaut", "chelsea", "coffee", "rocket"]
MODELS = ["dinov2_vits14 (offline)", "deit_small_patch16_224.fb_in1k"]


def parse(query: str, steps: int = 9) -> View:
    return parse_view(dict(parse_qsl(query.lstrip("?"))), EXAMPLES, MODELS, steps)


def test_no_parameters_is_the_lecture_on_the_first_example():
    assert parse("") == View(tab="lecture", example="astronaut", step=1)


def test_attention_link_is_read_exactly():
    view = parse("?tab=attention&example=chelsea&size=448&layer=6&head=3")
    assert (view.tab, view.example, view.size, view.layer, view.head) == (
        "attention", "chelsea", 448, 6, "3")
    assert view.notes == ()


@pytest.mark.parametrize("query, field", [
    ("tab=nope", "tab"), ("example=dog", "example"), ("size=abc", "size"), ("size=0", "size"),
    ("size=5000", "size"), ("layer=0", "layer"), ("layer=x", "layer"), ("head=-1", "head"),
    ("head=avg", "head"), ("step=0", "step"), ("step=10", "step"), ("presenter=maybe", "presenter"),
    ("model=resnet50", "model"), ("sinks=hidden", "sinks"),
])
def test_bad_values_fall_back_with_one_note(query, field):
    view = parse(query)
    default = View(example="astronaut")
    assert getattr(view, field) == getattr(default, field)
    assert len(view.notes) == 1


def test_lab_is_a_tab_links_open():
    view = parse("tab=lab&example=coffee")
    assert view.tab == "lab" and view.example == "coffee" and not view.notes


def test_values_are_trimmed_and_case_folded():
    view = parse("tab=%20Attention&example=CHELSEA&head=MAX&presenter=yes&step=9")
    assert (view.tab, view.example, view.head, view.presenter, view.step) == (
        "attention", "chelsea", "max", True, 9)


def test_geometry_checks_layer_and_head():
    # A ViT-S: 12 blocks of 6 heads. Layer 12 and head 6 exist, 13 and 7 do not.
    assert fit_geometry(parse("layer=12&head=6"), 12, 6).notes == ()
    fitted = fit_geometry(parse("layer=13&head=7"), 12, 6)
    assert (fitted.layer, fitted.head, len(fitted.notes)) == (None, "mean", 2)
    assert fit_geometry(parse("head=min"), 12, 6).head == "min"


def test_head_choice_spells_the_dropdown():
    assert head_choice("mean") == "mean"
    assert head_choice("3") == "head 3"


def test_one_spelling_of_a_head_both_ways():
    assert head_choices(3) == ["mean", "max", "min", "head 1", "head 2", "head 3"]
    for choice in head_choices(12):
        parsed = parse_head(choice)
        assert choice == (parsed if isinstance(parsed, str) else head_label(parsed))
    assert parse_head("head 3") == 2  # 0-based inside
    for bad in ("head 0", "head", "head x", "3", "avg", "Head 3"):
        with pytest.raises(ValueError, match="Unknown head"):
            parse_head(bad)


def test_the_app_builds_every_tab_links_know_once_in_their_order():
    import app

    demo = app.build_demo()
    ids = [block.id for block in demo.blocks.values() if isinstance(block, gr.Tab)]
    assert ids == list(TAB_KEYS)
    assert [t.title for t in TABS] == [block.label for block in demo.blocks.values()
                                       if isinstance(block, gr.Tab)]


def test_query_round_trips_and_leaves_defaults_out():
    view = parse("tab=attention&example=rocket&size=224&layer=2&head=4&presenter=1")
    query = view_query(view)
    assert query == "?tab=attention&example=rocket&size=224&layer=2&head=4&presenter=1"
    assert parse(query) == view
    assert view_query(parse("tab=tokens&example=coffee&layer=3")) == "?tab=tokens&example=coffee"
    assert view_query(parse("step=4")) == "?tab=lecture&example=astronaut&step=4"


def test_the_sink_view_travels_in_attention_links_only():
    view = parse("tab=attention&example=chelsea&sinks=Masked")
    assert view.sinks == "masked" and not view.notes
    assert view_query(view) == "?tab=attention&example=chelsea&sinks=masked"
    assert parse(view_query(view)) == view
    assert view_query(parse("tab=attention&sinks=shown")) == "?tab=attention&example=astronaut"
    assert "sinks" not in view_query(parse("tab=tokens&sinks=masked"))
    # the radio's spelling and the link's, both ways
    assert [sink_choice(s) for s in SINKS] == list(SINK_VIEWS)
    assert [sink_param(c) for c in SINK_VIEWS] == list(SINKS) and sink_param(None) == "shown"


def test_model_names_are_encoded():
    query = view_query(parse("tab=distance&model=dinov2_vits14 (offline)"))
    assert query == "?tab=distance&example=astronaut&model=dinov2_vits14+%28offline%29"
    assert parse(query).model == "dinov2_vits14 (offline)"


def test_example_name_from_cached_paths():
    assert example_name("/tmp/gradio/ab12/chelsea.jpg", EXAMPLES) == "chelsea"
    assert example_name("/tmp/gradio/ab12/my-cat.png", EXAMPLES) is None
    assert example_name(None, EXAMPLES) is None
