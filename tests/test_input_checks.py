"""What stops an analysis before it starts (`explorer.ui.common.input_problems`, the run
buttons' validator): no image, a refused name, a hub model that cannot be fetched offline."""

from __future__ import annotations

import pytest

from explorer import models
from explorer.ui import common


def _hub_entry() -> str:
    names = [n for n, e in models.CATALOGUE.items() if e.source == "hub"
             and not models.hub_weights_cached(e.architecture)]
    if not names:
        pytest.skip("every catalogue hub model is cached here")
    return names[0]


def test_no_image_is_a_problem_of_the_image_input():
    problems = common.input_problems(None, None)
    assert problems == {"image": common.NO_IMAGE}
    assert common.input_problems("photo.jpg", None) == {}  # the offline default loads


def test_an_uncached_hub_model_offline_is_a_problem_of_the_model_input(monkeypatch):
    name = _hub_entry()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # huggingface_hub's own switch: no hub
    problems = common.input_problems("photo.jpg", name)
    assert set(problems) == {"model"} and "cannot be reached" in problems["model"]
    assert models.offline_problem(None) is None and models.offline_problem(models.DEFAULT_MODEL) is None


def test_a_refused_name_is_a_problem_that_names_no_path():
    problems = common.input_problems("photo.jpg", "/etc/passwd")
    assert set(problems) == {"model"} and "/etc" not in problems["model"]


def test_the_validator_answers_one_check_per_input_in_order():
    check = common.validator("image", "model", None)
    image, model, other = check(None, None, 3)
    assert (image["is_valid"], image["message"]) == (False, common.NO_IMAGE)
    assert model["is_valid"] and other["is_valid"]


def test_hub_models_are_marked_in_the_picker_and_an_offline_one_says_so_when_picked(monkeypatch):
    choices = dict((value, label) for label, value in common.model_choices(models.model_names()))
    hub = [n for n, e in models.CATALOGUE.items() if e.source == "hub"]
    assert len(hub) == 5 and choices[models.DEFAULT_MODEL] == models.DEFAULT_MODEL
    for name in hub:  # each says whether it needs the internet or is here already
        here = models.hub_weights_cached(models.CATALOGUE[name].architecture)
        assert choices[name] == f"{name} ({'hub, downloaded' if here else 'needs internet'})"
    name = _hub_entry()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "Cannot load here now" in common.model_notice(name).info
    assert common.model_notice(models.DEFAULT_MODEL).info == models.describe(models.DEFAULT_MODEL)


def test_a_failed_run_is_kept_for_its_box_and_raised_quietly():
    import gradio as gr

    def broken():
        raise gr.Error("This file is not an image PIL can read.")

    run = common.reported(broken, "test")
    with pytest.raises(gr.Error) as raised:
        run()
    # API clients still get the error; the browser gets no toast and the log no traceback
    assert raised.value.message == "This file is not an image PIL can read."
    assert not raised.value.visible and not raised.value.print_exception
    assert common.show_failure("test")() == ("**Could not finish:** This file is not an image "
                                             "PIL can read.")
    assert common.show_failure("test")() == f"**Could not finish.** {common.BUG}"  # once
    assert common.reported(lambda: {"summary": "ok"}, "test")() == {"summary": "ok", "message": ""}
    assert common.reported(lambda: {"x": 1}, "test", clear=False)() == {"x": 1}
