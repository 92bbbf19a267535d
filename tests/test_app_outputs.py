"""Outputs by name (`explorer.ui.outputs`): what gradio receives from a callback that returns
``{name: value}``, for plain and streaming callbacks, and what it sees of their signature."""

from __future__ import annotations

import inspect

import gradio as gr
import pytest

from explorer.ui.outputs import Outputs


@pytest.fixture
def outputs():
    with gr.Blocks():
        return Outputs(summary=gr.Markdown(), image=gr.Image(), plot=gr.Plot())


def test_names_become_the_events_components_in_the_declared_order(outputs):
    def draw(request: gr.Request = None):
        return {"plot": "figure", "summary": "text"}

    event = outputs.event(draw, "summary", "plot")
    assert event["outputs"] == [outputs["summary"], outputs["plot"]]
    assert event["fn"]() == {outputs["plot"]: "figure", outputs["summary"]: "text"}
    assert outputs.event(draw)["outputs"] == list(outputs.components.values())  # default: all
    # gradio reads the wrapped function's parameters (to pass the request, the progress bar)
    assert inspect.signature(event["fn"]) == inspect.signature(draw)


def test_a_name_the_event_does_not_output_raises_and_nothing_changed_skips(outputs):
    event = outputs.event(lambda: {"image": None}, "summary")
    with pytest.raises(KeyError, match=r"\['image'\]: not outputs of this event \(summary\)"):
        event["fn"]()
    assert outputs.event(lambda: {}, "summary", "plot")["fn"]() == gr.skip()


def test_a_stream_yields_by_component_and_stops_its_source_when_closed(outputs):
    closed = []

    def train():
        try:
            for step in range(10):
                yield {"summary": f"step {step}"}
        finally:
            closed.append(True)  # e.g. a training job's cancel flag is set here

    fn = outputs.event(train, "summary", "plot")["fn"]
    assert inspect.isgeneratorfunction(fn)  # gradio streams only a generator function
    stream = fn()
    assert next(stream) == {outputs["summary"]: "step 0"}
    assert next(stream) == {outputs["summary"]: "step 1"}
    stream.close()  # the client went away
    assert closed == [True]
