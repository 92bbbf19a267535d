"""Fine-tuning tab: train a ViT on your own images (or Fashion-MNIST) and see what it learnt.

Training events share one concurrency group of size one (``concurrency_id="finetune"``):
one job at a time, others wait in the queue, and the analysis tabs (group "analysis") keep
serving. The trained model is saved in timm's checkpoint layout (config.json +
model.safetensors, loadable with ``timm.create_model("local-dir:<dir>", pretrained=True)``)
and saved for the session that trained it (`explorer.session_context`): it appears in that
session's pickers in every tab, with its download, and nowhere else; its files go when the
session ends, idles out or the disk quota needs room.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr

from explorer import datasets, gpu, images, models, patches
from explorer.finetune import FinetuneConfig, position_similarity_map, run_finetune, save_checkpoint
from explorer.finetune.checkpoint import run_name
from explorer.finetune.engine import cancelled_event, finetune_seconds, too_long_for_one_call
from explorer.finetune.igpt_probe import igpt_layerwise, load_offline_igpt
from explorer.finetune.probe import vit_layerwise_probe
from explorer.finetune.resolution import snap_resolution
from explorer.plots import finetune as plots
from explorer.ui import common, links
from explorer.ui.outputs import Outputs
from explorer.ui.presenter import TabLink

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
JOB = "finetune"  # the session's job kind (`explorer.session_context.SessionContext.job`)


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
        with common.user_errors():
            return datasets.fashion_mnist("train", int(n_images), seed=0)
    if not zip_path:
        raise gr.Error("Upload a .zip of class folders first (or choose the built-in data).")
    if Path(zip_path).stat().st_size > MAX_ZIP_BYTES:
        raise gr.Error(f"The zip is larger than {MAX_ZIP_BYTES >> 20} MB; please upload less.")
    with common.user_errors():
        return datasets.ingest_zip(zip_path)


def describe_data(source, zip_path, n_images):
    """Class counts before training (the `/finetune_data` API endpoint).

    Returns:
        ``(summary, counts figure)``.
    """
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
    """Train and stream curves, then show results (the `/finetune` API endpoint): yields
    the outputs that change (`live_update`, then `finish`)."""
    config = training_config(mode_label, last_k, resolution, epochs, lr, batch_size,
                             probe_block)
    data = load_data(source, zip_path, n_images)
    try:
        with common.session(request).job(JOB) as cancel:  # set on the way out: the engine stops
            train_set, val_set = datasets.train_val_split(data, 0.2, seed=config.seed)
            model = fresh_model(model_name, config.resolution, request)
            if (config.probe_block or 0) > len(model.blocks):
                raise gr.Error(f"This model has {len(model.blocks)} blocks; probe one of those.")
            if gpu.on_zero_gpu():  # one GPU call holds the whole run: refuse what ZeroGPU cuts off
                too_long = too_long_for_one_call(model, len(train_set), len(val_set), config)
                if too_long:
                    raise gr.Error(too_long, print_exception=False)
            # on ZeroGPU the run borrows a GPU in a worker; elsewhere the plain call
            events = gpu.stream_on_device(
                run_finetune, model, train_set, val_set, config, cancel=cancel,
                model_key=model_name,
                seconds=finetune_seconds(model, len(train_set), len(val_set), config),
                on_cancel=partial(cancelled_event, model, train_set, config))
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


def live_update(event, history: list[dict]) -> dict:
    """Outputs while training: the status and the curves change; the rest is left as it is."""
    status = f"**{event.stage}** {event.done}/{event.total}"
    if "loss" in event.metrics:
        status += f" · loss {event.metrics['loss']:.3f} · batch acc {event.metrics['acc']:.2f}"
    if "val_acc" in event.metrics:
        status += f" · validation acc {event.metrics['val_acc']:.3f}"
    return {"status": status, **({"curves": plots.training_curves(history)} if history else {})}


def finish(result, val_set, model_name, config, source, request=None) -> dict:
    """Outputs after training: save the model for this session, build the result views."""
    curves = plots.training_curves(result.history)
    if result.cancelled:
        return {"status": "**Cancelled.** Nothing was saved.", "curves": curves, "result": "",
                "confusion": None, "wrong": None, "pos_map": None, "checkpoint": None}
    label = run_name(model_name, config, "fashion-mnist" if source == BUILTIN else "upload")
    with common.user_errors():
        # the zip goes inside gradio's cache folder, so gradio serves it as it is (no copy
        # that would outlive the session)
        saved = common.session(request).save_model(
            label, lambda out: save_checkpoint(result, out, model_name, config),
            downloads=Path(gr.utils.get_upload_folder()))
    grid = plots.misclassified_grid(val_set, result.val_labels, result.val_preds)
    summary = (f"**Validation accuracy {result.val_acc:.1%}** on {len(val_set)} images at "
               f"{result.resolution[1]}×{result.resolution[0]} px. Saved as "
               f"**{saved.name}**: pick it in the other tabs to compare with "
               f"**{model_name}**." + ("" if grid is not None else " No validation image "
                                        "was misclassified."))
    return {"status": "**Done.**", "curves": curves, "result": summary,
            "confusion": plots.confusion_figure(result.confusion, result.classes), "wrong": grid,
            "pos_map": plots.position_similarity_image(position_similarity_map(result.model)),
            "checkpoint": str(saved.download)}


def layerwise(source, zip_path, n_images, model_name, resolution, request: gr.Request,
              progress=gr.Progress()):  # noqa: B008
    """Linear-probe accuracy after every block (the `/finetune_layerwise` API endpoint).

    On the built-in Fashion-MNIST the iGPT trained here is probed too, when it exists.

    Returns:
        ``(status, probe figure)``.
    """
    data = load_data(source, zip_path, n_images)
    try:
        with common.session(request).job(JOB) as cancel:
            train_set, val_set = datasets.train_val_split(data, 0.2, seed=0)
            model = fresh_model(model_name, int(resolution) if resolution else None, request)
            size = snap_resolution(model, int(resolution) if resolution else None)
            # features and probes where the GPU is (on ZeroGPU: GPU calls, which cancel closes)
            runs = [(model_name, vit_layerwise_probe(model, train_set, val_set, size, 64,
                                                     model_name, cancel))]
            igpt = load_offline_igpt() if source == BUILTIN else None
            if igpt is not None:
                runs.append((igpt.name, igpt_layerwise(igpt, train_set, val_set, 64, cancel)))
            probes = []
            for name, run in runs:
                for stage, done, probe in common_errors(run):  # e.g. out of memory: a message
                    progress((done, None), desc=f"{name}: {stage}")
                    if probe is not None:
                        probes.append(probe)
        if len(probes) < len(runs):
            return "**Cancelled.**", None
        best = "; ".join(f"{p.model_name}: best after block {p.best_depth} of {len(p.depths)} "
                         f"({max(p.val_acc):.1%})" for p in probes)
        return f"**Layer-wise probe done.** {best}.", plots.probe_depth_figure(probes)
    finally:
        data.cleanup()


def cancel_job(request: gr.Request) -> str:
    """Stop this session's running job between two batches (the `/finetune_cancel` endpoint)."""
    if common.session(request).stop(JOB):
        return "Cancelling after the current batch…"
    return ("Nothing of yours is running. (A job still waiting in the queue starts when the "
            "current one ends; cancel it then.)")


def build_finetune_tab(ctx: common.TabContext) -> TabLink:
    """Components and events of the tab; call inside ``with gr.Tab(...)``.

    Returns:
        What a link to this tab sets (`explorer.ui.presenter`): nothing but the tab.
    """
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
            model = common.model_dropdown(elem_id="ft-model")
            mode = gr.Radio(list(MODE_LABELS), value=next(iter(MODE_LABELS)), label="Mode",
                            elem_id="ft-mode")
            # Block limits come from the model: the default's, then `depth_controls`.
            depth = models.vit_geometry(None).depth
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
        with gr.Column():
            _, wrong = common.figure("Misclassified validation images (true → predicted)",
                                     "ft-misclassified", format="png", height=420)
    with gr.Row():
        with gr.Column():
            _, pos_map = common.figure("Position-embedding similarity at the training grid",
                                       "ft-pos-similarity", format="png", height=420)
        depth_plot = gr.Plot(label="Linear probe vs depth", elem_id="ft-depth")

    out = Outputs(status=status, curves=curves, result=result_md, confusion=confusion,
                  wrong=wrong, pos_map=pos_map, checkpoint=checkpoint)
    data_inputs = [source, zip_file, n_images]
    # failures are said in place (the data summary, the status line), never as red badges
    # over the outputs, and the progress shows there too
    data_event = dict(fn=common.reported(describe_data, "ft-data"), inputs=data_inputs,
                      outputs=[data_md, counts], show_progress_on=[data_md], **ctx.analysis())
    for event in (show_data.click(**data_event, api_name="finetune_data"),
                  zip_file.upload(**data_event, api_name="finetune_data_upload")):
        common.on_failure(event, "ft-data", data_md)
    model_checked = common.validator(None, None, None, "model", *[None] * 7)
    trained = start.click(**out.event(common.reported(train, "ft", clear=False)),
                          inputs=[*data_inputs, model, mode, last_k, resolution, epochs, lr,
                                  batch_size, probe_block],
                          validator=model_checked, api_name="finetune", concurrency_limit=1,
                          concurrency_id="finetune", show_progress_on=[status])
    probed = probe_btn.click(common.reported(layerwise, "ft", clear=False),
                             inputs=[*data_inputs, model, resolution],
                             outputs=[status, depth_plot],
                             validator=common.validator(None, None, None, "model", None),
                             api_name="finetune_layerwise", concurrency_limit=1,
                             concurrency_id="finetune", show_progress_on=[status])
    for event in (trained, probed):
        common.on_failure(event, "ft", status)
    stop.click(cancel_job, outputs=status, api_name="finetune_cancel", queue=False)
    model.change(depth_controls, inputs=model, outputs=[last_k, probe_block],
                 api_name="finetune_geometry", show_progress="hidden", **ctx.views())
    return TabLink(links.FINETUNE)


DEFAULT_LAST_K = 2


def depth_controls(model_name):
    """The block controls for the picked model (`/finetune_geometry`): k up to its depth
    (default `DEFAULT_LAST_K`), the probed block up to its depth (0 = last).

    Returns:
        ``(k slider, probed block)`` updates, skipped when the model is not available.
    """
    geometry = common.model_geometry(model_name)
    if geometry is None:
        return gr.skip(), gr.skip()
    depth = geometry.depth
    return (gr.Slider(maximum=depth, value=min(DEFAULT_LAST_K, depth)),
            gr.Number(maximum=depth, info=f"this model has {depth} blocks"))
