"""Pieces every tab shares: what a tab builder gets from the app, the session of a request,
safe image input, the model picker, error mapping, examples."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import gradio as gr
from PIL import Image

from explorer import datasets, distance, images, models, patches, sessions, settings
from explorer.cache import KeyedCache
from explorer.errors import ModelUnavailableError, without_paths
from explorer.session_context import ModelSaveError, SessionContext, context
from explorer.settings import Settings
from explorer.store import STORE
from explorer.trainer_process import TrainerDied


@dataclass(frozen=True)
class TabContext:
    """What the app hands every tab builder.

    Attributes:
        settings: the app's settings (`explorer.settings.Settings`).
        presenter: the app's presenter switch (large text and figure labels), if any.
    """

    settings: Settings = field(default_factory=Settings)
    presenter: gr.Checkbox | None = None

    def analysis(self) -> dict:
        """Queue settings of an event that runs a forward pass: one group, "analysis",
        ``settings.concurrency`` at a time."""
        return {"concurrency_id": "analysis", "concurrency_limit": self.settings.concurrency}

    def completions(self) -> dict:
        """Queue settings of an iGPT completion: its own group, many at once, since they
        all join one running batch (`explorer.igpt.batch`) instead of each taking a core."""
        return {"concurrency_id": "completions",
                "concurrency_limit": self.settings.completion_concurrency}

    def views(self) -> dict:
        """Queue settings of a re-render from kept results (sliders, clicks): their own group,
        so they never wait behind the forward passes of "analysis"."""
        return {"concurrency_id": "views", "concurrency_limit": self.settings.view_concurrency}


@dataclass(frozen=True)
class ImageRequest:
    """What an image tab analyses: the upload, the model, the size (0: the model's default)
    and how the image is fitted. Tabs find each other's kept results by it."""

    image: str | None
    model: str | None
    width: float | None
    height: float | None
    fit: str


def apply_settings(s: Settings) -> None:
    """Hand the app's settings to the process-wide parts that serve every session: the model
    cache, the session store, the sessions' limits, the operator's models and data folders,
    and `explorer.settings.current` (the weights cache, Fashion-MNIST)."""
    settings.install(s)
    models.MODEL_CACHE.max_items = s.max_models
    STORE.resize(int(s.store_mb * 2**20))
    sessions.FINETUNES.limits = sessions.SessionLimits.from_settings(s)
    if s.models_dir:
        models.register_models_dir(s.models_dir)
    distance.use_data_dir(s.data_dir)


def example_images() -> list[str]:
    """`explorer.images.example_paths` as the strings ``gr.Examples`` takes."""
    return [str(p) for p in images.example_paths()]


class UploadImage(gr.Image):
    """A ``gr.Image`` whose upload problems reach the callback instead of failing gradio's
    preprocessing with a generic "Error" (and a traceback in the log).

    Gradio opens uploads with PIL before any callback runs, so a non-image or a
    decompression bomb would fail there. Here such an upload is handed to the callback as it
    came, whose `load_upload` explains it with `explorer.images.load_image`'s message.
    ``is_template``: the browser draws it with gradio's own Image component. A subclass, not
    a wrapped instance method: gradio rebuilds a session's copy of a component from its
    class whenever an event updates one of its properties, which dropped the wrapper.
    """

    is_template = True

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except gr.Error:
            raise
        except Exception as err:
            path = getattr(payload, "path", None)
            try:
                if path:
                    images.load_image(path)
            except images.ImageError:
                # The upload as it came: the callback's `load_upload` says what is wrong with
                # it. Raising here instead would fail an event's `validator` step (which
                # preprocesses too) with a bare "400 Bad Request" for API clients.
                return path
            raise gr.Error(f"Could not read this upload as an image ({type(err).__name__}).",
                           print_exception=False) from err


def upload_image(**kwargs) -> UploadImage:
    """The image input of a tab (`UploadImage`, ``type="filepath"``).

    ``image_mode=None`` hands the file over as uploaded: gradio's own conversion to RGB would
    clip a 16-bit image to white, while `explorer.images.load_image` stretches its range (and
    says so).
    """
    return UploadImage(type="filepath", image_mode=None, **kwargs)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors meant for people into `gr.Error`; anything else stays a bug."""
    try:
        yield
    except (images.ImageError, ModelUnavailableError, datasets.DatasetError, ModelSaveError,
            TrainerDied) as err:
        # no server path reaches a visitor, no traceback in the log for their mistake
        raise gr.Error(without_paths(str(err)), print_exception=False) from err
    except Exception as err:  # out-of-memory is the user's size choice, not a bug
        if "out of memory" in str(err).lower() or isinstance(err, MemoryError):
            raise gr.Error("Out of memory: try a lower resolution.", print_exception=False) from err
        raise


# The message of each session's last failed event, by (session, tab): `reported` keeps it,
# the event's ``.failure`` listener (`show_failure`) shows it beside the results.
_FAILURES: KeyedCache[str] = KeyedCache(max_items=4096)
BUG = ("Something went wrong on the server (a bug, not your input); the server log has the "
       "details. The controls still work: try again or change a setting.")


def _session_hash() -> str | None:
    from gradio.context import LocalContext

    return getattr(LocalContext.request.get(None), "session_hash", None)


def reported(fn: Callable, key: str, clear: bool = True) -> Callable:
    """``fn`` for an event whose failures are shown in place, not as toasts and red "Error"
    badges over every output (controls included).

    A `gr.Error` from ``fn`` is kept for the session under ``key`` and raised again without
    a toast and without a traceback in the log (a visitor's mistake is not a bug): API
    clients still get the error, and the event's ``.failure`` listener, `show_failure`,
    writes the message into the tab's message box (`message_box`). Wire the event with
    ``show_progress_on=[box]`` so its progress, and gradio's own error mark, appear there
    only. With ``clear`` (a run, not a redraw), success adds ``{"message": ""}`` to what
    ``fn`` returns (or first yields) by output name (`explorer.ui.outputs`): the box empties.
    """
    def fail(err: gr.Error):
        _FAILURES.put((_session_hash(), key), str(err.message))
        return gr.Error(str(err.message), visible=False, print_exception=False)

    def cleared(value, first: bool):
        return {**value, "message": ""} if clear and first and isinstance(value, dict) else value

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args, **kwargs):
            first = True
            try:
                for value in fn(*args, **kwargs):
                    yield cleared(value, first)
                    first = False
            except gr.Error as err:
                raise fail(err) from err

        return stream

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return cleared(fn(*args, **kwargs), True)
        except gr.Error as err:
            raise fail(err) from err

    return call


def show_failure(key: str) -> Callable[[], str]:
    """The ``.failure`` listener of a `reported` event: the kept message (or `BUG` when the
    failure was not a `gr.Error`), shown until the next run clears it."""
    def show() -> str:
        message = _FAILURES.get((_session_hash(), key))
        _FAILURES.evict((_session_hash(), key))
        return f"**Could not finish:** {message}" if message else f"**Could not finish.** {BUG}"

    show.__name__ = f"show_{key}_failure"
    return show


def message_box(prefix: str) -> gr.Markdown:
    """Where a tab says why its last run failed (persistent until the next run) and shows
    its progress: id ``{prefix}-message``."""
    return gr.Markdown("", elem_id=f"{prefix}-message", min_height=24)


def on_failure(event, key: str, box: gr.Markdown) -> None:
    """Show a `reported` event's failure in ``box`` (its ``.failure`` listener)."""
    event.failure(show_failure(key), outputs=box, api_name=False, queue=False,
                  show_progress="hidden")


def enable_with_image(image: gr.Image, *buttons: gr.Button) -> None:
    """``buttons`` clickable only while ``image`` holds a picture: toggled in the browser
    (no server round trip), so a link that sets the image and clicks at once finds the
    button ready. Create the buttons with ``interactive=False``."""
    for button in buttons:
        image.change(None, inputs=image, outputs=button, api_name=False, queue=False,
                     js="(img) => ({__type__: 'update', interactive: !!img})")


NO_IMAGE = "Please upload an image or pick an example first."


def input_problems(image_path: str | None, model_name: str | None,
                   request: gr.Request | None = None) -> dict[str, str]:
    """What stops an analysis before it starts, by input name ("image", "model"): no image;
    a model name this visitor may not load; a hub model not cached while the hub is out of
    reach. Quick (no weights are read): for an event's ``validator`` (`validator`)."""
    problems = {}
    if not image_path:
        problems["image"] = NO_IMAGE
    try:
        offline = models.offline_problem(session(request).resolve(model_name))
    except ModelUnavailableError as err:
        offline = without_paths(str(err))
    if offline:
        problems["model"] = offline
    return problems


def validator(*names: str | None):
    """An event's ``validator=`` for inputs named ``names`` in order (None: not checked):
    `input_problems`' messages appear beside their inputs, the analysis does not start, and
    its outputs (controls included) stay as they are; API calls get a validation error."""
    def check(*values, request: gr.Request | None = None):
        by_name = dict(zip(names, values, strict=False))
        problems = input_problems(by_name.get("image"), by_name.get("model"), request)
        return [gr.validate(name not in problems, problems.get(name, "")) for name in names]

    return check


def load_upload(path: str | None) -> Image.Image:
    """Open an uploaded image path as RGB, telling the person about any conversion."""
    if not path:
        raise gr.Error(NO_IMAGE, print_exception=False)
    with user_errors():
        loaded = images.load_image(path)
    for note in loaded.notes:
        gr.Warning(note)
    return loaded.image


def session(request: gr.Request | None = None) -> SessionContext:
    """The visitor's session (`explorer.session_context`): gradio's ``session_hash`` of
    ``request``, else of the event running now (gradio keeps its request in a context
    variable while a callback runs)."""
    from gradio.context import LocalContext

    request = request or LocalContext.request.get(None)
    return context(getattr(request, "session_hash", None))


def load_name(model_name: str | None, request: gr.Request | None = None) -> str:
    """A ViT name from the web -> the name to load (`SessionContext.resolve`): paths and
    ``local:`` are refused, a session's fine-tune is found for that session only."""
    with user_errors():
        return session(request).resolve(model_name)


def end_session(request: gr.Request) -> None:
    """``demo.unload``: the visitor closed the tab; their fine-tunes' files are deleted, their
    kept results forgotten and their running jobs stopped."""
    session(request).end()


def model_choices(names: list[str]) -> list[tuple[str, str]]:
    """A model picker's ``(label, name)`` choices: hub models say that they need internet
    (or that their weights are here already), so nobody finds out only when a run fails."""
    def label(name: str) -> str:
        entry = models.CATALOGUE.get(name)
        if entry is None or entry.source != "hub":
            return name
        here = models.hub_weights_cached(entry.architecture)
        return f"{name} ({'hub, downloaded' if here else 'needs internet'})"

    return [(label(n), n) for n in names]


MODEL_INFO = "Offline default, timm hub ViTs (need internet), or a model fine-tuned here."


def model_notice(model_name: str | None, request: gr.Request | None = None) -> gr.Dropdown:
    """On a pick (`model_dropdown`'s change): what the model is (`explorer.models.describe`),
    or, for a hub model that cannot be fetched now (offline, not cached), that it cannot
    load here: said when picked, not when run."""
    try:
        problem = models.offline_problem(session(request).resolve(model_name))
    except ModelUnavailableError as err:
        problem = without_paths(str(err))
    if problem:
        return gr.Dropdown(info=f"⚠ Cannot load here now: {problem}")
    return gr.Dropdown(info=models.describe(model_name))


def model_dropdown(label: str = "Model", value: str | None = None,
                   elem_id: str | None = None) -> gr.Dropdown:
    """A model picker: the catalogue plus operator and this session's fine-tuned checkpoints
    (`model_choices`: hub models marked), refreshed on focus; a pick says what the model is,
    or why it cannot load here (`model_notice`).

    ``allow_custom_value`` lets people type any timm ViT name (used when online); typed
    names go through `load_name`.
    """
    dropdown = gr.Dropdown(
        choices=model_choices(models.model_names()),
        value=value or models.DEFAULT_MODEL,
        label=label,
        allow_custom_value=True,
        info=MODEL_INFO,
        elem_id=elem_id,
    )
    dropdown.focus(refresh_model_choices, inputs=dropdown, outputs=dropdown,
                   api_name=False, queue=False, show_progress="hidden")
    dropdown.input(model_notice, inputs=dropdown, outputs=dropdown, api_name=False,
                   show_progress="hidden", concurrency_limit=None)
    return dropdown


def image_and_model(prefix: str, height: int = 260) -> tuple[gr.Image, gr.Dropdown]:
    """The image upload with the bundled examples under it, then the model picker.

    Element ids: ``{prefix}-image``, ``{prefix}-examples``.
    """
    image = upload_image(label="Image", height=height, elem_id=f"{prefix}-image")
    gr.Examples(example_images(), inputs=image, label="Examples", elem_id=f"{prefix}-examples")
    return image, model_dropdown(elem_id=f"{prefix}-model")


def figure(caption: str, elem_id: str, **kwargs) -> tuple[gr.Markdown, gr.Image]:
    """An output image with its caption above it, never on it: gradio draws an image's label
    over the picture's top-left corner (token indices, the first tiles of a strip), and on a
    phone a long label covers much of it. The label stays the image's name for downloads.

    Ids: ``elem_id`` for the image, ``{elem_id}-caption`` for the caption (an output too,
    when the caption depends on the model).
    """
    # (not in a gr.Group: grouped images opened in a tab by a link drew 0 px tall)
    caption_md = gr.Markdown(caption, elem_id=f"{elem_id}-caption")
    image = gr.Image(label=caption, show_label=False, interactive=False, elem_id=elem_id,
                     **kwargs)
    return caption_md, image


def resolution_inputs(prefix: str) -> tuple[gr.Number, gr.Number, gr.Radio]:
    """Width, height (0 = the model's default) and how to fit the image.

    Ids ``{prefix}-width``/``-height``. The default size comes from the loaded model
    (`explorer.patches.ModelGeometry.default_size`), so no size is written here.
    """
    with gr.Row():
        width = gr.Number(value=0, label="Width (px)", precision=0, minimum=0,
                          elem_id=f"{prefix}-width")
        height = gr.Number(value=0, label="Height (px)", precision=0, minimum=0,
                           elem_id=f"{prefix}-height")
    fit = gr.Radio(["crop", "stretch"], value="crop", label="Fit",
                   info="crop keeps the aspect ratio; 0 in width/height = the model's default "
                        f"(its native size, at most {patches.DEFAULT_MAX_GRID} patches a side)")
    return width, height, fit


def refresh_model_choices(current: str | None, request: gr.Request) -> gr.Dropdown:
    """The dropdown update that lists every model this session may pick now, keeping the
    current choice."""
    return gr.Dropdown(choices=model_choices(session(request).model_names()),
                       value=current or models.DEFAULT_MODEL)


def resolution_for(model, data_config, width: float | None, height: float | None):
    """(height, width) snapped to the model's patch size; 0/None -> the model's default side.

    Tells the person (`gr.Info`) when a typed size was snapped.
    """
    geometry = patches.model_geometry(model, data_config)
    patch = geometry.patch
    wanted = (int(height or 0) or geometry.default_size[0], int(width or 0) or geometry.default_size[1])
    size = (images.snap_to_patch(wanted[0], patch[0]), images.snap_to_patch(wanted[1], patch[1]))
    if size != wanted:
        gr.Info(f"Resolution snapped to {size[1]}x{size[0]}: a multiple of the {patch[1]}x{patch[0]} "
                "px patch.")
    images.check_size(size, patch)
    return size


def model_geometry(model_name: str | None) -> patches.ModelGeometry | None:
    """The geometry of the named ViT, read without its weights (`explorer.models.vit_geometry`),
    or None when it is not available here.

    For control updates on a model change: a model that is unavailable leaves the controls
    as they are, and the analysis itself then tells the person why.
    """
    try:
        return models.vit_geometry(session().resolve(model_name))
    except ModelUnavailableError:
        return None


def model_and_pixels(image_path, model_name, width, height, fit):
    """Callback prologue of the image tabs: the upload, the model, and its prepared input.

    Returns:
        ``(model, data_config, pixels)``; pixels is (1, 3, H, W) at the chosen resolution,
        on the model's device.
    """
    image = load_upload(image_path)
    name = load_name(model_name)
    with user_errors():
        model, data_config = models.load_vit(name)
        size = resolution_for(model, data_config, width, height)
        pixels = images.prepare_pixels(image, data_config, size, fit)
    return model, data_config, pixels.to(patches.model_device(model))
