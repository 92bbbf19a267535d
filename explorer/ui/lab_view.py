"""The lab tab's view model (no gradio): the shipped grid and models it shows, and what they
say in words. The Lecture's lab steps read the same (`explorer.ui.lecture_tab`); figures are
built in `explorer.plots.lab`.
"""

from __future__ import annotations

import numpy as np
import torch

from explorer.lab import analysis, grid
from explorer.lab.checkpoint import load_shipped, shipped_path
from explorer.lab.engine import Budget, LabRun
from explorer.lab.models import ARCH_LABELS

INTRO = """
### Inductive bias & scale, trained here
A CNN builds in locality, a 2-D neighbourhood and translation equivariance; a ViT must learn
them from data. Here four models of about 0.2 M parameters learn Fashion-MNIST **from
scratch** on 500 to 60,000 images: a CNN, a ViT with absolute position embeddings, the same
ViT with a learned **relative-position bias** w(i−j) instead (CoAtNet's attention), and a
miniature **CoAtNet** (MBConv stage, then relative attention). Budget rule, the same for
every run: {rule}. Test error is on all 10,000 test images.
"""
NO_GRID = "*No grid shipped yet: run `python -m explorer.lab.grid`.*"


def grid_rows() -> list[dict]:
    """The shipped grid, one row per run (`explorer.lab.grid.read_grid`)."""
    return grid.read_grid()


def shipped_sizes() -> list[int]:
    """Training-set sizes of the shipped relative-attention models, ascending."""
    return sorted({n for arch, n in grid.KEEP_MODELS
                   if arch == "vit_rel" and shipped_path(LabRun(arch, n)).is_file()})


def bias_tables(train_images: int | None = None) -> torch.Tensor:
    """(L, H, 2h-1, 2w-1) learned relative-position bias of the shipped relative model
    trained on ``train_images`` (default: the largest shipped).

    Raises:
        FileNotFoundError: no such model is shipped.
    """
    sizes = shipped_sizes()
    if not sizes and train_images is None:
        raise FileNotFoundError("No relative-attention model is shipped: run "
                                "`python -m explorer.lab.grid`.")
    return analysis.relative_tables(load_shipped("vit_rel", train_images or sizes[-1]))


def intro_text(budget: Budget | None = None) -> str:
    return INTRO.format(rule=(budget or Budget()).sentence())


def summary_text(rows: list[dict]) -> str:
    """What the grid shows, in words, from its numbers."""
    curves = analysis.error_vs_data(rows)
    if not curves:
        return NO_GRID
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


def live_message(result, rows: list[dict], run: LabRun, budget: Budget) -> str:
    """A finished live run in words, beside the shipped grid's run of the same recipe (only
    when it ran under the grid's budget)."""
    seeds = analysis.seed_runs(rows, run.arch, run.train_images) if budget == Budget() else []
    shipped = [r for r in seeds if r["seed"] == run.seed]
    message = (f"**Done in {result.seconds:.0f} s: test accuracy {100 * result.test_acc:.2f}%** "
               f"(train {100 * result.train_acc:.1f}%).")
    if shipped:
        spread = [r["test_acc"] for r in seeds]
        message += (f" The shipped grid has {100 * shipped[0]['test_acc']:.2f}% for this run; "
                    f"its seeds span {100 * min(spread):.2f}–{100 * max(spread):.2f}%.")
    return message
