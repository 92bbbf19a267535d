"""Pieces every tab shares: safe image input, model picker, error mapping, examples."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import gradio as gr
from PIL import Image

from explorer import datasets, images, models, patches, sessions
from explorer.errors import ModelUnavailableError, without_paths


def example_images() -> list[str]:
    """`explorer.images.example_paths` as the strings ``gr.Examples`` takes."""
    return [str(p) for p in images.example_paths()]


def upload_image(**kwargs) -> gr.Image:
    """A ``gr.Image(type="filepath")`` whose upload problems reach the person as `gr.Error`.

    Gradio opens uploads with PIL before any callback runs, so a non-image or a
    decompression bomb would otherwise fail with a generic "Error". Here the same failure is
    explained by `explorer.images.load_image`'s message. (A subclass of gr.Image would need
    its own front-end component, so the instance's ``preprocess`` is wrapped instead.)
    """
    component = gr.Image(type="filepath", **kwargs)
    plain_preprocess = component.preprocess

    def preprocess(payload):
        try:
            return plain_preprocess(payload)
        except gr.Error:
            raise
        except Exception as err:
            path = getattr(payload, "path", None)
            try:
                if path:
                    images.load_image(path)
            except images.ImageError as image_err:
                raise gr.Error(without_paths(str(image_err))) from err
            raise gr.Error(f"Could not read this upload as an image ({type(err).__name__}).") from err

    component.preprocess = preprocess
    return component


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors meant for people into `gr.Error`; anything else stays a bug."""
    try:
        yield
    except (images.ImageError, ModelUnavailableError, datasets.DatasetError) as err:
        raise gr.Error(without_paths(str(err))) from err  # no server path reaches a visitor
    except Exception as err:  # out-of-memory is the user's size choice, not a bug
        if "out of memory" in str(err).lower() or isinstance(err, MemoryError):
            raise gr.Error("Out of memory: try a lower resolution.") from err
        raise


def load_upload(path: str | None) -> Image.Image:
    """Open an uploaded image path as RGB, telling the person about any conversion."""
    if not path:
        raise gr.Error("Please upload an image or pick an example first.")
    with user_errors():
        loaded = images.load_image(path)
    for note in loaded.notes:
        gr.Warning(note)
    return loaded.image


def session_id(request: gr.Request | None = None) -> str:
    """The visitor's session: gradio's ``session_hash`` of ``request``, else of the event
    running now (gradio keeps its request in a context variable while a callback runs)."""
    from gradio.context import LocalContext

    request = request or LocalContext.request.get(None)
    return getattr(request, "session_hash", None) or "no-session"


def load_name(model_name: str | None, request: gr.Request | None = None) -> str:
    """A ViT name from the web -> the name to load (`explorer.sessions.resolve_web_name`):
    paths and ``local:`` are refused, a session's fine-tune is found for that session only."""
    with user_errors():
        return sessions.resolve_web_name(model_name, session_id(request))


def model_names(request: gr.Request | None = None) -> list[str]:
    """What this session's pickers list: catalogue, operator models, its fine-tunes."""
    return sessions.web_model_names(session_id(request))


def end_session(request: gr.Request) -> None:
    """``demo.unload``: the visitor closed the tab; their fine-tunes' files are deleted."""
    sessions.FINETUNES.end(session_id(request))


def model_dropdown(label: str = "Model", value: str | None = None) -> gr.Dropdown:
    """A model picker: the catalogue plus operator and this session's fine-tuned checkpoints,
    refreshed on focus.

    ``allow_custom_value`` lets people type any timm ViT name (used when online); typed
    names go through `load_name`.
    """
    dropdown = gr.Dropdown(
        choices=models.model_names(),
        value=value or models.DEFAULT_MODEL,
        label=label,
        allow_custom_value=True,
        info="Offline default, timm hub ViTs (need internet), or a model fine-tuned here.",
    )
    dropdown.focus(refresh_model_choices, inputs=dropdown, outputs=dropdown,
                   api_name=False, queue=False, show_progress="hidden")
    return dropdown


def image_and_model(prefix: str, height: int = 260) -> tuple[gr.Image, gr.Dropdown]:
    """The image upload with the bundled examples under it, then the model picker.

    Element ids: ``{prefix}-image``, ``{prefix}-examples``.
    """
    image = upload_image(label="Image", height=height, elem_id=f"{prefix}-image")
    gr.Examples(example_images(), inputs=image, label="Examples", elem_id=f"{prefix}-examples")
    return image, model_dropdown()


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
    return gr.Dropdown(choices=model_names(request), value=current or models.DEFAULT_MODEL)


def concurrency_limit() -> int:
    """Simultaneous analysis requests per event (env ``VIT_EXPLORER_CONCURRENCY``).

    Two by default: on a 2-core CPU Space more parallel forwards only share the same cores
    and make everyone's latency worse; waiting requests queue instead.
    """
    return int(os.environ.get("VIT_EXPLORER_CONCURRENCY", "2"))


def views_queue() -> dict:
    """Queue settings of re-renders from kept results (sliders, clicks): their own
    concurrency group, so they never wait behind forward passes in "analysis" (env
    ``VIT_EXPLORER_VIEW_CONCURRENCY``, default 4: a re-render is ~50 ms of CPU)."""
    return {"concurrency_id": "views",
            "concurrency_limit": int(os.environ.get("VIT_EXPLORER_VIEW_CONCURRENCY", "4"))}


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


def default_geometry() -> patches.ModelGeometry:
    """The default model's geometry without loading it: what the controls start with."""
    entry = models.CATALOGUE[models.DEFAULT_MODEL]
    return patches.architecture_geometry(entry.architecture, dynamic_img_size=True)


def model_geometry(model_name: str | None) -> patches.ModelGeometry | None:
    """The geometry of the named ViT (loaded, cached), or None when it cannot be loaded here.

    For control updates on a model change: a model that is unavailable leaves the controls
    as they are, and the analysis itself then tells the person why.
    """
    try:
        name = sessions.resolve_web_name(model_name, session_id())
        model, data_config = models.load_vit(name)
    except ModelUnavailableError:
        return None
    return patches.model_geometry(model, data_config)


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
