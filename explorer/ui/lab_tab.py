"""The "Inductive bias & scale" tab: the shipped grid, the scaling view, relative attention
made visible, and a live run that lands on the plot and opens in the other tabs.

Wiring only: training is `explorer.lab.engine`, the numbers `explorer.lab.analysis`, the
figures `explorer.plots.lab`.
"""

from __future__ import annotations

import gradio as gr
import torch

from explorer import gpu, trainer_process
from explorer.cache import KeyedCache
from explorer.lab import analysis, grid
from explorer.lab.checkpoint import VIT_ARCHS, load_shipped, save_vit, shipped_version
from explorer.lab.engine import (
    LIVE_BUDGET,
    Budget,
    LabRun,
    normalise,
    run_lab,
    run_steps,
    test_subset,
)
from explorer.lab.models import ARCH_LABELS, LAB_ARCHS, PATCH
from explorer.lab.sweep import hyper_for
from explorer.plots import lab as plots
from explorer.plots.lecture import for_projector, paper_data_figure, paper_scaling_figure
from explorer.session_context import SessionContext
from explorer.ui import common, lab_view, links
from explorer.ui.outputs import Outputs
from explorer.ui.presenter import TabLink

LIVE_SIZES = (500, 1200, 3000)
SHIFT_IMAGES = 64
JOB = "lab"  # the session's job kind (`explorer.session_context.SessionContext.job`)
_SHIFT_CACHE: KeyedCache[dict] = KeyedCache(max_items=4)
SHIFT_ARCHS = ("cnn", "vit", "vit_rel")  # the translation test's models


def relative_views(train_images, is_presenter: bool = False) -> dict:
    """The learned bias tables of the shipped relative model and the translation test of the
    shipped models trained on the same number of images (the `/lab_relative` endpoint), by
    output name; while the grid has not kept those models yet, ``rel_status`` says so in
    place and the plots stay empty."""
    train_images = int(train_images)
    try:
        tables = lab_view.bias_tables(train_images)
    except FileNotFoundError:
        return {"rel_status": f"*The relative-attention model trained on {train_images:,} "
                              "images is still training: the grid keeps it when its run "
                              "finishes.*", "bias_plot": None, "shift_plot": None}

    def compute() -> dict:
        x, _ = test_subset()
        pixels = normalise(x[:SHIFT_IMAGES])
        models = {}
        for arch in SHIFT_ARCHS:
            try:
                models[arch] = load_shipped(arch, train_images)
            except FileNotFoundError:
                continue
        with torch.no_grad():
            return analysis.shift_equivariance_table(models, pixels, PATCH)

    with common.user_errors():
        # keyed on the model files as they are now: one the grid replaces is measured again
        table = _SHIFT_CACHE.get_or_build(
            tuple(shipped_version(LabRun(a, train_images)) for a in SHIFT_ARCHS), compute)
    return {"rel_status": "",
            "bias_plot": for_projector(plots.relative_bias_figure(tables), is_presenter),
            "shift_plot": for_projector(plots.shift_figure(table, PATCH), is_presenter)}


def live_run(arch: str, train_images, seed, session: SessionContext, budget: Budget):
    """Train one grid point live under ``budget``; streams ``status`` and the ``live_plot``,
    then lands the point on the grid's ``data_plot`` and, for a ViT, adds the model to the
    session's pickers."""
    if arch not in LAB_ARCHS:
        raise gr.Error(f"Pick an architecture: {', '.join(LAB_ARCHS)}.")
    train_images, seed = int(train_images or 0), int(seed or 0)
    if train_images not in LIVE_SIZES or seed not in grid.SEEDS:
        raise gr.Error(f"Live runs use {', '.join(map(str, LIVE_SIZES))} images and seed "
                       f"{' or '.join(map(str, grid.SEEDS))}.")
    run = LabRun(arch, train_images, seed)
    title = f"{ARCH_LABELS[arch]} on {train_images:,} images (seed {seed})"
    history: list[tuple[int, float, float | None]] = []
    result = None
    # on ZeroGPU the run borrows a GPU in a worker, sized by its steps alone (the lab's 28-px
    # models are launch-bound; its ~50 evaluation batches are within the rule's margin); on a
    # CPU it trains in a child process that keeps its heap (`explorer.trainer_process`)
    # the grid's recipe at the live budget's own steps (the sweep's floor is the grid's)
    hyper = hyper_for(arch).recipe()
    steps = run_steps(run, budget, hyper)
    seconds = gpu.training_seconds(steps)
    # the first step comes after the trainer's start and the data (seconds): say so at once
    yield {"status": f"Starting: {title}, {steps:,} steps…"}
    with session.job(JOB) as cancel, common.user_errors():  # e.g. no Fashion-MNIST: a message
        events = trainer_process.stream_training(run_lab, run, budget, hyper, cancel=cancel,
                                                 seconds=seconds, log_every=25)
        for event in events:
            history.append((event.step, event.loss, event.val_acc))
            result = event.result or result
            if result is None:
                yield {"status": f"Step {event.step:,} / {event.total_steps:,}…",
                       "live_plot": plots.live_figure(history, title)}
    if result is None:
        yield {"status": "Stopped.", "live_plot": plots.live_figure(history, title)}
        return
    rows = lab_view.grid_rows()
    message = lab_view.live_message(result, rows, run, budget)
    if arch in VIT_ARCHS:
        with common.user_errors():
            saved = session.save_model(
                f"lab-{run.name}", lambda out: save_vit(result.model, run, out, result.row()))
        message += (f" Saved as **{saved.name}**: pick it in *Attention maps* or *Mean attention "
                    "distance* to see how local its heads are beside DINOv2's.")
    live = {"arch": arch, "train_images": train_images, "error": 1 - result.test_acc,
            "steps": result.steps}
    yield {"status": message, "live_plot": plots.live_figure(history, title),
           "data_plot": plots.data_figure(rows, live)}


def grid_figures(is_presenter: bool = False, rows: list[dict] | None = None,
                 attempts: list[dict] | None = None) -> dict:
    """The tab's figures of the shipped grid (``rows`` and ``attempts``, default: read now)
    and the paper's numbers, by output name, with large labels when presenting (the
    `/lab_figures` endpoint; redrawn when the presenter switch changes)."""
    rows = lab_view.grid_rows() if rows is None else rows
    attempts = lab_view.attempt_rows() if attempts is None else attempts
    made = {"data_plot": plots.data_figure(rows), "scrambled_plot": plots.scrambled_figure(rows),
            "paper_plot": paper_data_figure(), "compute_plot": plots.scaling_figure(rows, attempts),
            "paper_scaling_plot": paper_scaling_figure()}
    return {name: for_projector(fig, bool(is_presenter)) for name, fig in made.items()}


def stop(request: gr.Request) -> str:
    """Stop this session's live run after its current step (the `/lab_stop` endpoint)."""
    common.session(request).stop(JOB)
    return "Stopping after this step…"


def build_runs_view(rows: list[dict], attempts: list[dict]) -> None:
    """Every finished run and retrained attempt in a table, and the validation curve of the
    one picked, with the line the convergence rule fitted."""
    runs = {lab_view.run_name(r): r for r in attempts + rows}
    table = lab_view.runs_table(rows, attempts)
    with gr.Accordion(f"Every run: its numbers and validation curve "
                      f"({lab_view.runs_count(rows, attempts)})", open=False, elem_id="lab-runs"):
        # widths that keep every value on one line at 1440 px ("original", a run's name)
        gr.Dataframe(table, headers=list(lab_view.RUN_HEADERS), interactive=False, wrap=True,
                     elem_id="lab-runs-table",
                     column_widths=[f"{w}%" for w in (17, 9, 6, 7, 6, 5, 6, 5, 6, 5, 5, 5, 5, 5, 8)])
        names = [line[0] for line in table]  # the table's order (sorted names put 500 last)
        pick = gr.Dropdown(names, value=names[0] if names else None, label="Run",
                           elem_id="lab-run-pick")

        def curve(name: str | None):
            row = runs.get(name)
            return plots.run_curve_figure(row, lab_view.run_title(row)) if row else None

        plot = gr.Plot(curve(pick.value), label="Validation curve", elem_id="lab-run-curve")
        pick.change(curve, inputs=pick, outputs=plot, api_name="lab_run_curve",
                    concurrency_limit=None)


def build_lab_tab(ctx: common.TabContext) -> TabLink:
    """Components and events of the tab; call inside ``with gr.Tab(...)``."""
    rows, attempts = lab_view.grid_rows(), lab_view.attempt_rows()  # read once, at build
    figures = grid_figures(rows=rows, attempts=attempts)
    gr.Markdown(lab_view.intro_text())
    gr.Markdown(lab_view.progress_text(attempts=attempts), elem_id="lab-progress")
    with gr.Row():
        data_plot = gr.Plot(figures["data_plot"], label="Trained here", elem_id="lab-data-plot")
        scrambled_plot = gr.Plot(figures["scrambled_plot"], elem_id="lab-scrambled-plot",
                                 label="Trained here, on scrambled images")
    gr.Markdown(lab_view.summary_text(rows), elem_id="lab-summary")
    gr.Markdown(lab_view.scrambled_text(rows), elem_id="lab-scrambled")
    with gr.Row():
        paper_plot = gr.Plot(figures["paper_plot"], elem_id="lab-paper-plot",
                             label="The paper's numbers (not measured here)")
        gr.Markdown("\n\n".join(t for t in (lab_view.convergence_text(rows),
                                             lab_view.longer_text(rows, attempts)) if t),
                    elem_id="lab-convergence")
    with gr.Row():
        compute_plot = gr.Plot(figures["compute_plot"], label="Scaling, trained here",
                               elem_id="lab-compute-plot")
        paper_scaling_plot = gr.Plot(figures["paper_scaling_plot"],
                                     label="The paper's numbers (not measured here)",
                                     elem_id="lab-paper-scaling-plot")
    gr.Markdown(lab_view.scaling_text(rows, attempts), elem_id="lab-scaling")
    if ctx.presenter is not None:  # large labels on a projector, as the Lecture's figures
        fig_out = Outputs(data_plot=data_plot, scrambled_plot=scrambled_plot,
                          paper_plot=paper_plot, compute_plot=compute_plot,
                          paper_scaling_plot=paper_scaling_plot)
        ctx.presenter.change(**fig_out.event(grid_figures), inputs=ctx.presenter,
                             api_name="lab_figures", concurrency_limit=None)
    build_runs_view(rows, attempts)

    gr.Markdown("### Relative attention, made visible\nThe relative model's attention logits "
                "get a learned bias w(i−j) per head that depends only on where a key sits "
                "relative to its query; below, each head's table. Then a **translation test**: "
                f"shift {SHIFT_IMAGES} test images by one patch ({PATCH} px); an equivariant "
                "layer's output moves with the input. The CNN's feature maps are the reference.")
    # every size the grid keeps models for; one still training says so when picked
    sizes = sorted({n for a, n in grid.KEEP_MODELS if a == "vit_rel"})
    shipped = lab_view.shipped_sizes()
    with gr.Row():
        rel_size = gr.Dropdown(sizes, value=(shipped or sizes)[-1],
                               label="Shipped models trained on (images)",
                               elem_id="lab-rel-size", scale=2)
        rel_run = gr.Button("Show the bias tables and the translation test", variant="primary",
                            elem_id="lab-relative-run", scale=1)
    with gr.Row():
        bias_plot = gr.Plot(label="Learned relative-position bias", elem_id="lab-bias-plot")
        shift_plot = gr.Plot(label="Translation test", elem_id="lab-shift-plot")
    presenter = ctx.presenter if ctx.presenter is not None else gr.Checkbox(False, visible=False)
    rel_status = gr.Markdown(elem_id="lab-rel-status")
    rel_out = Outputs(rel_status=rel_status, bias_plot=bias_plot, shift_plot=shift_plot)
    rel_run.click(**rel_out.event(relative_views), inputs=[rel_size, presenter],
                  api_name="lab_relative", **ctx.analysis())

    gr.Markdown("### A live run\nTrain one point of the grid here, with the grid's recipe cut "
                f"to a **shorter budget: {LIVE_BUDGET.min_steps:,} steps** instead of the "
                f"grid's {Budget().min_steps:,} or more (a few minutes on a 2-core CPU; runs "
                "queue one at a time): a preview, not the grid's converged point. A ViT then "
                "opens in the other tabs.")
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
    out = Outputs(status=status, live_plot=live_plot, data_plot=data_plot)
    # A live run's budget: `LIVE_BUDGET`, unless the settings fix its steps (tests, demos).
    steps = ctx.settings.lab_steps
    budget = Budget(min_steps=steps, epochs=0, evals=2) if steps else LIVE_BUDGET

    def train_live(arch, train_images, seed, request: gr.Request):
        """Train one grid point live (the `/lab_train` endpoint); see `live_run`."""
        yield from live_run(arch, train_images, seed, common.session(request), budget)

    train.click(**out.event(train_live), inputs=[arch, n, seed], api_name="lab_train",
                concurrency_id="lab-train", concurrency_limit=1)
    stop_btn.click(stop, outputs=status, api_name="lab_stop", concurrency_limit=None)
    return TabLink(links.LAB, run_id="lab-relative-run")
