"""The "Inductive bias & scale" tab: the shipped grid, the scaling view, relative attention
made visible, and a live run that lands on the plot and opens in the other tabs.

Wiring only: training is `explorer.lab.engine`, the numbers `explorer.lab.analysis`, the
figures `explorer.plots.lab`.
"""

from __future__ import annotations

import os
import secrets
import threading

import gradio as gr
import numpy as np
import torch

from explorer import sessions
from explorer.cache import KeyedCache
from explorer.finetune.checkpoint import finetuned_dir
from explorer.lab import analysis, grid
from explorer.lab.checkpoint import VIT_ARCHS, load_shipped, save_vit, shipped_path
from explorer.lab.engine import Budget, LabRun, normalise, run_lab, test_subset
from explorer.lab.models import ARCH_LABELS, LAB_ARCHS, PATCH
from explorer.plots import lab as plots
from explorer.plots.lecture import paper_data_figure, paper_scaling_figure
from explorer.ui import common
from explorer.ui.presenter import TabLink

INTRO = """
### Inductive bias & scale, trained here
A CNN builds in locality, a 2-D neighbourhood and translation equivariance; a ViT must learn
them from data. Here four models of about 0.2 M parameters learn Fashion-MNIST **from
scratch** on 500 to 60,000 images: a CNN, a ViT with absolute position embeddings, the same
ViT with a learned **relative-position bias** w(i−j) instead (CoAtNet's attention), and a
miniature **CoAtNet** (MBConv stage, then relative attention). Budget rule, the same for
every run: {steps:,} optimisation steps of {batch} images (so 500 images are seen {epochs_small}
times each and 60,000 about once). Test error is on all 10,000 test images.
"""
LIVE_SIZES = (500, 1200, 3000)
# A live run's budget: the grid's, unless VIT_EXPLORER_LAB_STEPS shortens it (tests, demos);
# only a run under the grid's budget is compared with its shipped point.
LIVE_STEPS = int(os.environ.get("VIT_EXPLORER_LAB_STEPS", Budget.steps))
SHIFT_IMAGES = 64
_cancel: dict[str, threading.Event] = {}
_SHIFT_CACHE: KeyedCache[dict] = KeyedCache(max_items=4)


def data_figure(live: dict | None = None):
    return plots.error_vs_data_figure(analysis.error_vs_data(grid_rows()), live)


def compute_figure():
    rows = grid_rows()
    curves = analysis.compute_curves(rows)
    if not curves:
        return None
    cnn = analysis.compute_curves(rows, "cnn", {c.train_images for c in curves})
    return plots.compute_figure(curves, cnn)


def bias_figure(train_images: int | None = None):
    """The bias tables of the shipped relative model (the largest data size by default)."""
    sizes = shipped_sizes()
    if not sizes:
        raise gr.Error("No relative-attention model is shipped: run `python -m explorer.lab.grid`.")
    model = load_shipped("vit_rel", train_images or sizes[-1])
    return plots.relative_bias_figure(analysis.relative_tables(model))


def intro_text(budget: Budget | None = None) -> str:
    budget = budget or Budget()
    return INTRO.format(steps=budget.steps, batch=budget.batch,
                        epochs_small=budget.steps * budget.batch // 500)


def grid_rows() -> list[dict]:
    return grid.read_grid()


def summary_text(rows: list[dict]) -> str:
    """What the grid shows, in words, from its numbers."""
    curves = analysis.error_vs_data(rows)
    if not curves:
        return "*No grid shipped yet: run `python -m explorer.lab.grid`.*"
    best = analysis.winners(curves)
    parts = [f"{n:,}: **{ARCH_LABELS[a]}**" for n, a in best.items()]
    seconds = sum(r["seconds"] for r in rows)
    largest = max(best)
    fits = []
    for arch in curves:
        at = analysis.seed_runs(rows, arch, largest)
        if at:
            train = 100 * sum(r["train_acc"] for r in at) / len(at)
            test = 100 * sum(r["test_acc"] for r in at) / len(at)
            fits.append(f"{ARCH_LABELS[arch]} {train:.0f}% / {test:.0f}%")
    return ("Lowest mean test error at each training-set size — " + "; ".join(parts) +
            f". Training vs test accuracy at {largest:,} images: " + ", ".join(fits) +
            " (training accuracy barely above test accuracy means the model is still "
            "underfitting: limited by the training budget rather than by data). "
            f"Grid: {len(rows)} runs, {seconds / 3600:.1f} CPU-hours of training.")


def scaling_text(rows: list[dict]) -> str:
    """Which ViT size is best at a few compute budgets, per data size, in words."""
    curves = analysis.compute_curves(rows)
    if not curves:
        return ""
    lines = []
    for n in sorted({c.train_images for c in curves}):
        group = [c for c in curves if c.train_images == n]
        budgets = np.geomspace(min(min(c.compute) for c in group),
                               max(max(c.compute) for c in group), 4)
        best = analysis.best_per_budget(group, budgets)
        steps = ", ".join(f"{b:.0e} → {w}" for b, w in zip(budgets, best, strict=True))
        lines.append(f"- {n:,} images: best width at training FLOPs {steps}")
    return "**Best ViT width within each compute budget**\n" + "\n".join(lines)


def shipped_sizes() -> list[int]:
    return sorted({n for arch, n in grid.KEEP_MODELS
                   if arch == "vit_rel" and shipped_path(LabRun(arch, n)).is_file()})


def relative_views(train_images: int, is_presenter: bool = False):
    """The learned bias tables of the shipped relative model and the translation test of the
    shipped models trained on the same number of images (the `/lab_relative` endpoint)."""
    from explorer.plots.lecture import for_projector

    train_images = int(train_images)
    try:
        rel = load_shipped("vit_rel", train_images)
    except FileNotFoundError as err:
        raise gr.Error(f"No shipped relative-attention model for {train_images:,} images.") from err
    tables = analysis.relative_tables(rel)  # (shipped: the file exists)

    def compute() -> dict:
        x, _ = test_subset()
        pixels = normalise(x[:SHIFT_IMAGES])
        models = {}
        for arch in ("cnn", "vit", "vit_rel"):
            try:
                models[arch] = load_shipped(arch, train_images)
            except FileNotFoundError:
                continue
        with torch.no_grad():
            return analysis.shift_equivariance_table(models, pixels, PATCH)

    with common.user_errors():
        table = _SHIFT_CACHE.get_or_build(str(train_images), compute)
    return (for_projector(plots.relative_bias_figure(tables), is_presenter),
            for_projector(plots.shift_figure(table, PATCH), is_presenter))


def live_run(arch: str, train_images, seed, request: gr.Request):
    """Train one grid point live (the `/lab_train` endpoint); streams curves, then lands the
    point on the grid's plot and, for a ViT, adds the model to this session's pickers."""
    if arch not in LAB_ARCHS:
        raise gr.Error(f"Pick an architecture: {', '.join(LAB_ARCHS)}.")
    train_images, seed = int(train_images or 0), int(seed or 0)
    if train_images not in LIVE_SIZES or seed not in grid.SEEDS:
        raise gr.Error(f"Live runs use {', '.join(map(str, LIVE_SIZES))} images and seed "
                       f"{' or '.join(map(str, grid.SEEDS))}.")
    session = common.session_id(request)
    cancel = _cancel.setdefault(session, threading.Event())
    cancel.clear()
    run, budget = LabRun(arch, train_images, seed), Budget(steps=LIVE_STEPS)
    title = f"{ARCH_LABELS[arch]} on {train_images:,} images (seed {seed})"
    history: list[tuple[int, float, float | None]] = []
    result = None
    with common.user_errors():  # e.g. Fashion-MNIST not installed: a message, no path
        for event in run_lab(run, budget, cancel, log_every=25):
            history.append((event.step, event.loss, event.test_acc))
            result = event.result or result
            if result is None:
                yield (f"Step {event.step:,} / {event.total_steps:,}…",
                       plots.live_figure(history, title), gr.skip())
    if result is None:
        yield "Stopped.", plots.live_figure(history, title), gr.skip()
        return
    rows = grid_rows()
    seeds = analysis.seed_runs(rows, arch, train_images, budget.steps)
    shipped = [r for r in seeds if r["seed"] == seed]
    message = (f"**Done in {result.seconds:.0f} s: test accuracy {100 * result.test_acc:.2f}%** "
               f"(train {100 * result.train_acc:.1f}%).")
    if shipped:
        spread = [r["test_acc"] for r in seeds]
        message += (f" The shipped grid has {100 * shipped[0]['test_acc']:.2f}% for this run; "
                    f"its seeds span {100 * min(spread):.2f}–{100 * max(spread):.2f}%.")
    if arch in VIT_ARCHS:
        label = f"lab-{run.name}"
        folder = finetuned_dir() / "sessions" / secrets.token_hex(8)
        try:
            out = save_vit(result.model, run, folder / label, result.row())
        except OSError as err:
            raise gr.Error(f"Could not save the model ({err.strerror or type(err).__name__}).") from err
        name = sessions.unguessable_name(label)
        sessions.FINETUNES.add(session, name, out, files=(folder,))
        message += (f" Saved as **{name}**: pick it in *Attention maps* or *Mean attention "
                    "distance* to see how local its heads are beside DINOv2's.")
    live = {"arch": arch, "train_images": train_images, "error": 1 - result.test_acc}
    yield (message, plots.live_figure(history, title),
           plots.error_vs_data_figure(analysis.error_vs_data(rows), live))


def stop(request: gr.Request) -> str:
    event = _cancel.get(common.session_id(request))
    if event is not None:
        event.set()
    return "Stopping after this step…"


def build_lab_tab(presenter: gr.Checkbox | None = None) -> TabLink:
    """Components and events of the tab; call inside ``with gr.Tab(...)``.

    Args:
        presenter: the app's presenter switch (large figure fonts), if any.
    """
    rows = grid_rows()
    gr.Markdown(intro_text())
    with gr.Row():
        data_plot = gr.Plot(data_figure(),
                            label="Trained here", elem_id="lab-data-plot")
        gr.Plot(paper_data_figure(), label="The paper's numbers (not measured here)",
                elem_id="lab-paper-plot")
    gr.Markdown(summary_text(rows), elem_id="lab-summary")
    with gr.Row():
        gr.Plot(compute_figure(), label="Scaling, trained here", elem_id="lab-compute-plot")
        gr.Plot(paper_scaling_figure(), label="The paper's numbers (not measured here)",
                elem_id="lab-paper-scaling-plot")
    gr.Markdown(scaling_text(rows), elem_id="lab-scaling")

    gr.Markdown("### Relative attention, made visible\nThe relative model's attention logits "
                "get a learned bias w(i−j) per head that depends only on where a key sits "
                "relative to its query; below, each head's table. Then a **translation test**: "
                "shift 64 test images by one patch (4 px); an equivariant layer's output moves "
                "with the input. The CNN's feature maps are the reference.")
    sizes = shipped_sizes() or [60000]
    with gr.Row():
        rel_size = gr.Dropdown(sizes, value=sizes[-1], label="Shipped models trained on (images)",
                               elem_id="lab-rel-size", scale=2)
        rel_run = gr.Button("Show the bias tables and the translation test", variant="primary",
                            elem_id="lab-relative-run", scale=1)
    with gr.Row():
        bias_plot = gr.Plot(label="Learned relative-position bias", elem_id="lab-bias-plot")
        shift_plot = gr.Plot(label="Translation test", elem_id="lab-shift-plot")
    presenter_box = presenter if presenter is not None else gr.Checkbox(False, visible=False)
    rel_run.click(relative_views, inputs=[rel_size, presenter_box],
                  outputs=[bias_plot, shift_plot], api_name="lab_relative",
                  concurrency_id="analysis", concurrency_limit=common.concurrency_limit())

    gr.Markdown("### A live run\nTrain one point of the grid here, under the same budget "
                "(about 2–4 minutes on a 2-core CPU; runs queue one at a time). With the same "
                "seed it lands on the shipped point; a ViT then opens in the other tabs.")
    with gr.Row():
        arch = gr.Dropdown([(ARCH_LABELS[a], a) for a in LAB_ARCHS], value="vit",
                           label="Architecture", elem_id="lab-arch")
        n = gr.Dropdown(list(LIVE_SIZES), value=LIVE_SIZES[0], label="Training images",
                        elem_id="lab-n")
        seed = gr.Dropdown(list(grid.SEEDS), value=0, label="Seed", elem_id="lab-seed")
    with gr.Row():
        train = gr.Button("Train", variant="primary", elem_id="lab-train")
        stop_btn = gr.Button("Stop", elem_id="lab-stop")
    status = gr.Markdown(elem_id="lab-status")
    live_plot = gr.Plot(label="Live run", elem_id="lab-live-plot")
    train.click(live_run, inputs=[arch, n, seed], outputs=[status, live_plot, data_plot],
                api_name="lab_train", concurrency_id="lab-train", concurrency_limit=1)
    stop_btn.click(stop, outputs=status, api_name="lab_stop", concurrency_limit=None)
    return TabLink("lab", run_id="lab-relative-run")
