"""Outputs by name: a tab declares its output components once, callbacks return them by name.

A callback returns (or, streaming, yields) ``{"summary": text, "grid": image, ...}`` with the
outputs it changes; `Outputs.event` hands gradio ``{component: value}`` for exactly those, so
adding, removing or reordering a view cannot shift another, and an output left out of the
dict is left as it is shown. A name that is not one of the event's outputs raises at once.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr
from gradio.components import Component


class Outputs:
    """A tab's output components by name, in the order the API returns them.

    Args:
        components: ``name=component`` for every output of the tab.
    """

    def __init__(self, **components: Component):
        self.components = components

    def __getitem__(self, name: str) -> Component:
        return self.components[name]

    def event(self, fn: Callable, *names: str) -> dict[str, Any]:
        """``fn`` and ``outputs`` for an event listener: ``names`` (default: all) as the
        event's outputs, and ``fn`` wrapped so its ``{name: value}`` reach them.

        Usage: ``button.click(**outputs.event(render, "heads", "strip"), inputs=...)``.
        """
        chosen = {name: self.components[name] for name in (names or self.components)}
        convert = functools.partial(_by_component, fn.__name__, chosen)
        if inspect.isgeneratorfunction(fn):  # gradio streams only a generator function

            @functools.wraps(fn)
            def stream(*args, **kwargs) -> Iterator:
                values = fn(*args, **kwargs)
                try:
                    for changed in values:
                        yield convert(changed)
                finally:  # the client went away: ``fn``'s own clean-up (stop the job) runs now
                    values.close()

            return {"fn": stream, "outputs": list(chosen.values())}

        @functools.wraps(fn)
        def call(*args, **kwargs):
            return convert(fn(*args, **kwargs))

        return {"fn": call, "outputs": list(chosen.values())}


def _by_component(fn_name: str, chosen: dict[str, Component], values: dict[str, Any]):
    unknown = set(values) - set(chosen)
    if unknown:
        raise KeyError(f"{fn_name} returned {sorted(unknown)}: not outputs of this event "
                       f"({', '.join(chosen)}).")
    # gradio reads an empty dict as one value; a single skip() leaves every output as it is
    return {chosen[name]: value for name, value in values.items()} or gr.skip()
