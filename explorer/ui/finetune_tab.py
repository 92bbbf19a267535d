"""Fine-tuning tab: train a ViT on your own images (or Fashion-MNIST) and see what it learnt.

Training events share one concurrency group of size one (``concurrency_id="finetune"``):
one job at a time, others wait in the queue, and the analysis tabs (group "analysis") keep
serving. The trained model is saved in timm's checkpoint layout (config.json +
model.safetensors, loadable with ``timm.create_model("local-dir:<dir>", pretrained=True)``)
and registered for the session that trained it (`explorer.sessions.FINETUNES`): it appears
in that session's pickers in every tab, with its download, and nowhere else; its files go
when the session ends, idles out or the disk quota needs room.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from explorer import datasets, images, models, patches, sessions
from explorer.errors import without_paths
from explorer.finetune import (
    FinetuneConfig,
    position_similarity_map,
    run_finetune,
    save_checkpoint,
    zip_checkpoint,
)
from explorer.finetune.checkpoint import finetuned_dir, run_name
from explorer.finetune.igpt_probe import igpt_layerwise, load_offline_igpt
from explorer.finetune.probe import vit_layerwise_probe
from explorer.finetune.resolution import snap_resolution
from explorer.plots import finetune as plots
from explorer.ui import common

INTRO = """
**Transformers need data; a linear probe measures what they already know.** Train on the
built-in Fashion-MNIST subset or a zip of your own images (one folder per class). *Linear
probe* freezes the backbone, computes its features once and trains only a linear head: the
measure iGPT and DINOv2 report. *Last k blocks* and *full* fine-tune the network itself.
Training at a resolution other than the model's native one interpolates its position
embeddings to the new grid, as ViT does when fine-tuning at higher resolution. The result
appears in every tab's model picker (for you only: fine-tunes are private to this browser
session and deleted when it ends), to compare attention before and after.
"""
BUILTIN, UPLOAD = "Built-in Fashion-MNIST", "Upload a zip"
MODE_LABELS = {"Linear probe (frozen backbone)": "linear", "Last k blocks": "last_k",
               "Full fine-tune": "full"}
MAX_ZIP_BYTES = 200 << 20  # compressed upload; the unpacked size is capped by `Limits`
UPDATE_EVERY_S = 0.5  # stream UI updates at most this often
DOWNLOAD_PREFIX = "vit-explorer-ckpt-"  # + a random token: another session cannot guess it

_cancel_events: dict[str, threading.Event] = {}  # session -> its running job's cancel flag


@dataclass
class UiConfig:
    """The tab's training widgets, converted to an engine config in one place."""

    mode_label: str
    last_k: float
    resolution: float | None
    epochs: float
    lr: float | None
    batch_size: float
    probe_block: float | None = 0  # linear probe only; 0 / empty = last block

    def to_config(self) -> FinetuneConfig:
        mode = MODE_LABELS[self.mode_label]
        return FinetuneConfig(
            mode=mode, last_k=int(self.last_k),
            resolution=int(self.resolution) if self.resolution else None,
            epochs=int(self.epochs), lr=float(self.lr) if self.lr else None,
            batch_size=int(self.batch_size),
            probe_block=int(self.probe_block) if self.probe_block and mode == "linear" else None)


def load_data(source: str, zip_path: str | None, n_images: float) -> datasets.ImageSet:
    """The chosen data as an `ImageSet`, or `gr.Error` with the reason."""
    if source == BUILTIN:
        with _dataset_errors():
            return datasets.fashion_mnist("train", int(n_images), seed=0)
    if not zip_path:
        raise gr.Error("Upload a .zip of class folders first (or choose the built-in data).")
    if Path(zip_path).stat().st_size > MAX_ZIP_BYTES:
        raise gr.Error(f"The zip is larger than {MAX_ZIP_BYTES >> 20} MB; please upload less.")
    with _dataset_errors():
        return datasets.ingest_zip(zip_path)


@contextlib.contextmanager
def _dataset_errors():
    """`DatasetError` (a message for people) becomes `gr.Error`."""
    try:
        yield
    except datasets.DatasetError as err:
        raise gr.Error(without_paths(str(err))) from err


def describe_data(source, zip_path, n_images):
    """Class counts before training (the `/finetune_data` API endpoint)."""
    data = load_data(source, zip_path, n_images)
    try:
        train, val = datasets.train_val_split(data, 0.2, seed=0)
        skipped = ", ".join(f"{n} {why}" for why, n in data.skipped.items()) or "nothing"
        summary = (f"**{len(data)} images in {len(data.classes)} classes** → {len(train)} to "
                   f"train, {len(val)} to validate (stratified, seeded). Skipped: {skipped}.")
        return summary, plots.split_counts_figure(train.class_counts(), val.class_counts())
    finally:
        data.cleanup()


def train(source, zip_path, n_images, model_name, mode_label, last_k, resolution, epochs, lr,
          batch_size, probe_block=0, request: gr.Request = None,
          progress=gr.Progress()):  # noqa: B008
    """Train and stream curves, then show results (the `/finetune` API endpoint).

    Yields (status, curves, results, confusion, misclassified, position map, checkpoint).
    """
    config = training_config(mode_label, last_k, resolution, epochs, lr, batch_size,
                             probe_block)
    data = load_data(source, zip_path, n_images)
    cancel = _cancel_events.setdefault(_session(request), threading.Event())
    cancel.clear()
    try:
        train_set, val_set = datasets.train_val_split(data, 0.2, seed=config.seed)
        model = fresh_model(model_name, config.resolution, request)
        if (config.probe_block or 0) > len(model.blocks):
            raise gr.Error(f"This model has {len(model.blocks)} blocks; probe one of those.")
        events = run_finetune(model, train_set, val_set, config, cancel, model_key=model_name)
        history, last_update = [], 0.0
        for event in common_errors(events):
            if event.result is not None:
                yield finish(event.result, val_set, model_name, config, source, request)
                break
            if event.stage in ("train", "eval"):
                history.append(event.metrics)
            if time.monotonic() - last_update > UPDATE_EVERY_S or event.stage == "eval":
                last_update = time.monotonic()
                progress((event.done, event.total), desc=event.stage)
                yield live_update(event, history)
    finally:
        cancel.set()  # stops the engine if the client went away mid-run
        data.cleanup()


def training_config(*values) -> FinetuneConfig:
    """`UiConfig` -> engine config; empty or impossible settings become `gr.Error`."""
    try:
        return UiConfig(*values).to_config()
    except (TypeError, ValueError, KeyError) as err:
        raise gr.Error(f"Please check the training settings ({err}).") from err


def fresh_model(model_name: str, resolution: int | None, request: gr.Request | None = None):
    """A new copy of the model to train (never the cached one other tabs use), after checking
    that the resolution makes a sensible number of tokens."""
    name = common.load_name(model_name, request)
    with common.user_errors():
        model = models.build_vit(name)
        images.check_size(snap_resolution(model, resolution), patches.patch_size(model))
    return model


def common_errors(events):
    """Iterate the engine's events with errors meant for people mapped to `gr.Error`."""
    with common.user_errors():
        yield from events


def live_update(event, history: list[dict]):
    """Outputs while training: status and curves change; the rest is left as it is."""
    status = f"**{event.stage}** {event.done}/{event.total}"
    if "loss" in event.metrics:
        status += f" · loss {event.metrics['loss']:.3f} · batch acc {event.metrics['acc']:.2f}"
    if "val_acc" in event.metrics:
        status += f" · validation acc {event.metrics['val_acc']:.3f}"
    curves = plots.training_curves(history) if history else gr.skip()
    return status, curves, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()


def finish(result, val_set, model_name, config, source, request=None):
    """Outputs after training: save the model for this session, build the result views."""
    curves = plots.training_curves(result.history)
    if result.cancelled:
        return ("**Cancelled.** Nothing was saved.", curves, "", None, None, None, None)
    label = run_name(model_name, config, "fashion-mnist" if source == BUILTIN else "upload")
    picker_name, download = save_for_session(result, label, model_name, config, request)
    grid = plots.misclassified_grid(val_set, result.val_labels, result.val_preds)
    summary = (f"**Validation accuracy {result.val_acc:.1%}** on {len(val_set)} images at "
               f"{result.resolution[1]}×{result.resolution[0]} px. Saved as "
               f"**{picker_name}**: pick it in the other tabs to compare with "
               f"**{model_name}**." + ("" if grid is not None else " No validation image "
                                        "was misclassified."))
    return ("**Done.**", curves, summary, plots.confusion_figure(result.confusion, result.classes),
            grid, plots.position_similarity_image(position_similarity_map(result.model)),
            str(download))


def save_for_session(result, label, model_name, config, request=None) -> tuple[str, Path]:
    """Save the checkpoint and its download zip under random folder names and register both
    with the session (`explorer.sessions.FINETUNES`), which deletes them when it ends.

    The zip is written inside gradio's cache folder, so gradio serves it as it is (no copy
    that would outlive the session); its random folder is the only way to its URL.

    Returns:
        ``(picker name, download zip)``.
    """
    folder = finetuned_dir() / "sessions" / secrets.token_hex(8)
    try:
        out = save_checkpoint(result, folder / label, model_name, config)
    except OSError as err:  # a full disk, permissions: say so without the server's path
        shutil.rmtree(folder, ignore_errors=True)
        raise gr.Error(f"Could not save the model ({err.strerror or type(err).__name__}).") from err
    downloads = Path(gr.utils.get_upload_folder()) / (DOWNLOAD_PREFIX + secrets.token_urlsafe(16))
    downloads.mkdir(parents=True)
    download = downloads / f"{label}.zip"
    shutil.move(zip_checkpoint(out), download)
    name = sessions.unguessable_name(label)
    sessions.FINETUNES.add(common.session_id(request), name, out, files=(folder, downloads))
    return name, download


def layerwise(source, zip_path, n_images, model_name, resolution, request: gr.Request,
              progress=gr.Progress()):  # noqa: B008
    """Linear-probe accuracy after every block (the `/finetune_layerwise` API endpoint).

    On the built-in Fashion-MNIST the iGPT trained here is probed too, when it exists.
    """
    data = load_data(source, zip_path, n_images)
    cancel = _cancel_events.setdefault(_session(request), threading.Event())
    cancel.clear()
    try:
        train_set, val_set = datasets.train_val_split(data, 0.2, seed=0)
        model = fresh_model(model_name, int(resolution) if resolution else None, request)
        size = snap_resolution(model, int(resolution) if resolution else None)
        runs = [(model_name, vit_layerwise_probe(model, train_set, val_set, size, 64,
                                                 model_name, cancel))]
        igpt = load_offline_igpt() if source == BUILTIN else None
        if igpt is not None:
            runs.append((igpt.name, igpt_layerwise(igpt, train_set, val_set, 64, cancel)))
        probes = []
        for name, run in runs:
            for stage, done, probe in run:
                progress((done, None), desc=f"{name}: {stage}")
                if probe is not None:
                    probes.append(probe)
        if len(probes) < len(runs):
            return "**Cancelled.**", None
        best = "; ".join(f"{p.model_name}: best after block {p.best_depth} of {len(p.depths)} "
                         f"({max(p.val_acc):.1%})" for p in probes)
        return f"**Layer-wise probe done.** {best}.", plots.probe_depth_figure(probes)
    finally:
        cancel.set()
        data.cleanup()


def cancel_job(request: gr.Request) -> str:
    """Stop this session's running job between two batches (the `/finetune_cancel` endpoint)."""
    event = _cancel_events.get(_session(request))
    if event is None or event.is_set():
        return ("Nothing of yours is running. (A job still waiting in the queue starts when the "
                "current one ends; cancel it then.)")
    event.set()
    return "Cancelling after the current batch…"


def _session(request: gr.Request | None) -> str:
    return (request.session_hash if request is not None else None) or "api"


def build_finetune_tab() -> None:
    """Components and events of the tab; call inside ``with gr.Tab(...)``."""
    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column(scale=1):
            source = gr.Radio([BUILTIN, UPLOAD], value=BUILTIN, label="Data",
                              elem_id="ft-source")
            n_images = gr.Slider(50, 5000, value=300, step=50, label="Fashion-MNIST images",
                                 elem_id="ft-n-images")
            zip_file = gr.File(label="Zip of class folders (cats/1.jpg, dogs/2.jpg, …)",
                               file_types=[".zip"], type="filepath", elem_id="ft-zip")
            show_data = gr.Button("Show class counts", elem_id="ft-show-data")
            model = common.model_dropdown()
            mode = gr.Radio(list(MODE_LABELS), value=next(iter(MODE_LABELS)), label="Mode",
                            elem_id="ft-mode")
            # Block limits come from the model: the default's, then `depth_controls`.
            depth = common.default_geometry().depth
            last_k = gr.Slider(1, max(depth, 2), value=min(DEFAULT_LAST_K, depth), step=1,
                               label="k (last blocks trained)", elem_id="ft-last-k")
            with gr.Row():
                resolution = gr.Number(112, label="Resolution (px, 0 = native)", precision=0,
                                       minimum=0, elem_id="ft-resolution")
                epochs = gr.Number(3, label="Epochs", precision=0, minimum=1, maximum=100,
                                   elem_id="ft-epochs")
            with gr.Row():
                lr = gr.Number(0, label="Learning rate (0 = mode default)", minimum=0,
                               elem_id="ft-lr")
                batch_size = gr.Number(32, label="Batch size", precision=0, minimum=1,
                                       maximum=512, elem_id="ft-batch")
            probe_block = gr.Number(0, label="Linear probe: features after block (0 = last)",
                                    precision=0, minimum=0, maximum=depth, elem_id="ft-probe-block")
            with gr.Row():
                start = gr.Button("Train", variant="primary", elem_id="ft-train")
                stop = gr.Button("Cancel", variant="stop", elem_id="ft-cancel")
            probe_btn = gr.Button("Probe every layer", elem_id="ft-layerwise")
        with gr.Column(scale=2):
            data_md = gr.Markdown(elem_id="ft-data-summary")
            counts = gr.Plot(label="Class counts", elem_id="ft-counts")
            status = gr.Markdown(elem_id="ft-status")
            curves = gr.Plot(label="Loss and accuracy", elem_id="ft-curves")
            result_md = gr.Markdown(elem_id="ft-result")
            checkpoint = gr.File(label="Checkpoint (safetensors + config.json)",
                                 interactive=False, elem_id="ft-checkpoint")
    with gr.Row():
        confusion = gr.Plot(label="Confusion matrix", elem_id="ft-confusion")
        wrong = gr.Image(label="Misclassified validation images (true → predicted)",
                         format="png", interactive=False, height=420,
                         elem_id="ft-misclassified")
    with gr.Row():
        pos_map = gr.Image(label="Position-embedding similarity at the training grid",
                           format="png", interactive=False, height=420,
                           elem_id="ft-pos-similarity")
        depth_plot = gr.Plot(label="Linear probe vs depth", elem_id="ft-depth")

    data_inputs = [source, zip_file, n_images]
    data_event = dict(fn=describe_data, inputs=data_inputs, outputs=[data_md, counts],
                      concurrency_limit=common.concurrency_limit(), concurrency_id="analysis")
    show_data.click(**data_event, api_name="finetune_data")
    zip_file.upload(**data_event, api_name="finetune_data_upload")
    start.click(train, inputs=[*data_inputs, model, mode, last_k, resolution, epochs, lr,
                               batch_size, probe_block],
                outputs=[status, curves, result_md, confusion, wrong, pos_map, checkpoint],
                api_name="finetune", concurrency_limit=1, concurrency_id="finetune",
                show_progress_on=[status])
    probe_btn.click(layerwise, inputs=[*data_inputs, model, resolution],
                    outputs=[status, depth_plot], api_name="finetune_layerwise",
                    concurrency_limit=1, concurrency_id="finetune", show_progress_on=[status])
    stop.click(cancel_job, outputs=status, api_name="finetune_cancel", queue=False)
    model.change(depth_controls, inputs=model, outputs=[last_k, probe_block],
                 api_name="finetune_geometry", concurrency_limit=common.concurrency_limit(),
                 concurrency_id="analysis", show_progress="hidden")


DEFAULT_LAST_K = 2


def depth_controls(model_name):
    """The block controls for the picked model (`/finetune_geometry`): k up to its depth
    (default `DEFAULT_LAST_K`), the probed block up to its depth (0 = last)."""
    geometry = common.model_geometry(model_name)
    if geometry is None:
        return gr.skip(), gr.skip()
    depth = geometry.depth
    return (gr.Slider(maximum=depth, value=min(DEFAULT_LAST_K, depth)),
            gr.Number(maximum=depth, info=f"this model has {depth} blocks"))
