"""Links that open a prepared view: URL query parameters <-> a validated `View` (no gradio).

``?tab=attention&example=chelsea&size=448&layer=6&head=3`` opens the attention tab on the
bundled example *chelsea* at 448 px, block 6, head 3, and runs the analysis. Every value is
checked here, in one pure function; a value that does not fit falls back to the default and
adds a note the page shows (never an error page). Geometry checks (layer, head) take the
model's `explorer.patches.ModelGeometry`-style depth and head count as plain numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from urllib.parse import urlencode

from explorer.ui.attention_view import HEAD_FUSIONS, SINK_VIEWS, head_label


@dataclass(frozen=True)
class Tab:
    """One tab of the app: ``key`` names it in links (``?tab=<key>``) and in gradio
    (``gr.Tab(id=key)``), ``title`` is what the tab bar shows."""

    key: str
    title: str


LECTURE = Tab("lecture", "Lecture")
TOKENS = Tab("tokens", "Patch tokens")
ATTENTION = Tab("attention", "Attention maps")
DISTANCE = Tab("distance", "Mean attention distance")
IGPT = Tab("igpt", "iGPT")
FINETUNE = Tab("finetune", "Fine-tune")
LAB = Tab("lab", "Inductive bias & scale")
TABS = (LECTURE, TOKENS, ATTENTION, DISTANCE, IGPT, FINETUNE, LAB)  # in the app's order
TAB_KEYS = tuple(t.key for t in TABS)
MAX_SIZE = 1024  # px; larger sizes are refused here (the tabs' own size checks still apply)
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
# attention tab: sink tokens as they are or masked, as a link spells them (`SINK_VIEWS` order)
SINKS = ("shown", "masked")


@dataclass(frozen=True)
class View:
    """One prepared view of the app, as a link describes it.

    Attributes:
        tab: the key of one of `TABS`.
        example: a bundled example's name (file stem), or None for none.
        model: a model name from the catalogue, or None for the tab's default.
        size: square side in px, or None for the model's default.
        layer: attention block, 1-based, or None for the last.
        head: "mean" / "max" / "min" or a 1-based head as a string ("3").
        sinks: attention tab: attention sinks "shown" as they are or "masked" (`SINKS`).
        step: lecture step, 1-based.
        presenter: large text and figures for a projector.
        notes: what was ignored and why, for the page to show.
    """

    tab: str = LECTURE.key
    example: str | None = None
    model: str | None = None
    size: int | None = None
    layer: int | None = None
    head: str = "mean"
    sinks: str = SINKS[0]
    step: int = 1
    presenter: bool = False
    notes: tuple[str, ...] = field(default=())


def _int(value: str) -> int | None:
    try:
        return int(value.strip())
    except (ValueError, AttributeError):
        return None


def parse_view(
    params: Mapping[str, str],
    examples: Sequence[str],
    models: Sequence[str] = (),
    num_steps: int = 1,
) -> View:
    """The view a link's query parameters ask for, with a note per value that was ignored.

    Args:
        params: the query parameters (name -> value; only the first value of each).
        examples: names of the bundled examples (``explorer.images.example_paths`` stems).
        models: model names a link may name (the catalogue); empty = no ``model=`` allowed.
        num_steps: how many lecture steps there are.

    Returns:
        A `View`; ``layer``/``head`` are checked against a model later (`fit_geometry`).
    """
    notes: list[str] = []
    view = View()
    tab = params.get("tab", "").strip().lower()
    if tab in TAB_KEYS:
        view = replace(view, tab=tab)
    elif tab:
        notes.append(f"Unknown tab '{tab}' (one of {', '.join(TAB_KEYS)}); showing the lecture.")
    example = params.get("example", "").strip().lower()
    if example in examples:
        view = replace(view, example=example)
    elif example:
        notes.append(f"Unknown example '{example}' (one of {', '.join(examples)}); "
                     f"using {examples[0]}.")
    if view.example is None and examples:  # every view shows an image: the first example
        view = replace(view, example=examples[0])
    model = params.get("model", "").strip()
    if model in models:
        view = replace(view, model=model)
    elif model:
        notes.append(f"Unknown model '{model}'; using the default model.")
    if "size" in params:
        size = _int(params["size"])
        if size is not None and 1 <= size <= MAX_SIZE:
            view = replace(view, size=size)
        else:
            notes.append(f"Size '{params['size']}' is not a number of pixels from 1 to "
                         f"{MAX_SIZE}; using the model's default size.")
    if "layer" in params:
        layer = _int(params["layer"])
        if layer is not None and layer >= 1:
            view = replace(view, layer=layer)
        else:
            notes.append(f"Layer '{params['layer']}' is not a block number (1 = first); "
                         "using the last layer.")
    if "head" in params:
        head = params["head"].strip().lower()
        number = _int(head)
        if head in HEAD_FUSIONS or (number is not None and number >= 1):
            view = replace(view, head=str(number) if number is not None else head)
        else:
            notes.append(f"Head '{params['head']}' is not mean, max, min or a head number "
                         "(1 = first); using the mean over heads.")
    if "sinks" in params:
        sinks = params["sinks"].strip().lower()
        if sinks in SINKS:
            view = replace(view, sinks=sinks)
        else:
            notes.append(f"sinks='{params['sinks']}' is not {' or '.join(SINKS)}; attention "
                         "sinks are shown as they are.")
    if "step" in params:
        step = _int(params["step"])
        if step is not None and 1 <= step <= num_steps:
            view = replace(view, step=step)
        else:
            notes.append(f"Step '{params['step']}' is not a lecture step (1 to {num_steps}); "
                         "starting at step 1.")
    flag = params.get("presenter", "").strip().lower()
    if flag in TRUE:
        view = replace(view, presenter=True)
    elif flag and flag not in FALSE:
        notes.append(f"presenter='{flag}' is not 1 or 0; presenter mode stays off.")
    return replace(view, notes=tuple(notes))


def fit_geometry(view: View, depth: int, num_heads: int) -> View:
    """Check ``layer`` and ``head`` against a model with ``depth`` blocks of ``num_heads``.

    Out-of-range values fall back (layer: the last; head: the mean) with a note.
    """
    notes = list(view.notes)
    layer, head = view.layer, view.head
    if layer is not None and layer > depth:
        notes.append(f"Layer {layer} does not exist: this model has {depth} blocks; "
                     "using the last.")
        layer = None
    if head not in HEAD_FUSIONS and int(head) > num_heads:
        notes.append(f"Head {head} does not exist: this model has {num_heads} heads; "
                     "using the mean over heads.")
        head = "mean"
    return replace(view, layer=layer, head=head, notes=tuple(notes))


def head_choice(head: str) -> str:
    """A `View.head` as the attention tab's dropdown spells it ("mean", "head 3")."""
    return head if head in HEAD_FUSIONS else head_label(int(head) - 1)


def sink_choice(sinks: str) -> str:
    """A `View.sinks` as the attention tab's radio spells it (`SINK_VIEWS`)."""
    return SINK_VIEWS[SINKS.index(sinks)]


def sink_param(choice: str | None) -> str:
    """The attention tab's radio value as a link spells it (the default for none)."""
    return SINKS[SINK_VIEWS.index(choice)] if choice in SINK_VIEWS else SINKS[0]


def view_query(view: View) -> str:
    """The query string (with its ``?``) that `parse_view` turns back into ``view``.

    Defaults are left out, so links stay short; notes never travel.
    """
    params: dict[str, str] = {"tab": view.tab}
    if view.example:
        params["example"] = view.example
    if view.model:
        params["model"] = view.model
    if view.size:
        params["size"] = str(view.size)
    if view.tab == ATTENTION.key:
        if view.layer:
            params["layer"] = str(view.layer)
        if view.head != "mean":
            params["head"] = view.head
        if view.sinks != SINKS[0]:
            params["sinks"] = view.sinks
    if view.tab == LECTURE.key:
        params["step"] = str(view.step)
    if view.presenter:
        params["presenter"] = "1"
    return "?" + urlencode(params)


def example_name(path: str | None, examples: Sequence[str]) -> str | None:
    """The bundled example a (possibly cached copy's) file path shows, or None for an upload.

    Gradio copies example files into its cache and keeps their file name, so the stem is
    enough (``.../chelsea.jpg`` -> ``chelsea``).
    """
    if not path:
        return None
    stem = path.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0].lower()
    return stem if stem in examples else None
