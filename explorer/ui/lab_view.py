"""The lab tab's view model (no gradio): the shipped grid and models it shows, and what they
say in words. The Lecture's lab steps read the same (`explorer.ui.lecture_tab`); figures are
built in `explorer.plots.lab`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import replace

import numpy as np
import torch

from explorer.lab import analysis, grid, sweep
from explorer.lab.checkpoint import load_shipped, shipped_path
from explorer.lab.engine import Budget, Hyper, LabRun, run_steps
from explorer.lab.models import ARCH_LABELS
from explorer.lab.paths import ATTEMPTS_CSV, SUPERSEDED_CSV
from explorer.plots.axes import si

INTRO = """
### Inductive bias & scale, trained here
A CNN builds in locality, a 2-D neighbourhood and translation equivariance; a ViT must learn
them from data. Here four models of about 0.2 M parameters learn Fashion-MNIST **from
scratch** on 500 to 60,000 images: a CNN, a ViT with absolute position embeddings, the same
ViT with a learned **relative-position bias** w(i−j) instead (CoAtNet's attention), and a
miniature **CoAtNet** (MBConv stage, then relative attention). The budget rule, the same for
every run: {rule}. Test error is on all 10,000 test images.
"""
# The data scale of the lecture's claim (ViT paper, Figs. 3–4): ViT-L/16 trails BiT ResNets
# when pre-trained on ImageNet (1.3 M images), matches them on ImageNet-21k (14 M) and passes
# them on JFT-300M; on JFT subsets ViT-B/32 is behind ResNet50 at 9 M and ahead from 90 M.
PAPER_SCALE = ("In the ViT paper the crossover needs **10⁷–10⁸ training images** (ImageNet-21k, "
               "14 M; JFT-300M, 300 M); the largest set here has 6×10⁴, a thousand times less.")
SCRAMBLED_INTRO = (
    "**Inductive bias is an assumption: when it matches the data it saves data; when it does "
    "not, it costs.** The right plot trains the same models on *scrambled* Fashion-MNIST: one "
    "fixed shuffle of the 7×7 patch positions and of the pixels inside every 4×4 patch, the "
    "same for every image (after augmentation), so it is the same task with the pixels "
    "relabelled. A ViT with learned absolute positions cannot tell the difference (its "
    "position embeddings and patch projection absorb both shuffles); the CNN's locality and "
    "the relative bias now assume neighbourhoods that are not there.")
NO_GRID = "*No grid runs finished yet: run `python -m explorer.lab.grid`.*"


def grid_rows() -> list[dict]:
    """The shipped grid, one row per run (`explorer.lab.grid.read_grid`)."""
    return grid.read_grid()


def attempt_rows() -> list[dict]:
    """Attempts that did not converge and were retrained longer (`ATTEMPTS_CSV`)."""
    return grid.read_grid(ATTEMPTS_CSV)


def superseded_rows() -> list[dict]:
    """Rows trained with hyperparameters the sweep has since replaced (`SUPERSEDED_CSV`)."""
    return grid.read_grid(SUPERSEDED_CSV)


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


def intro_text(budget: Budget | None = None, choice: dict[str, Hyper] | None = None) -> str:
    """The tab's opening: what the lab is, the budget rule, and each architecture's recipe
    (`recipe_text`)."""
    recipe = recipe_text(choice, budget)
    return INTRO.format(rule=(budget or Budget()).sentence()) + (f"\n{recipe}\n" if recipe else "")


def recipe_text(choice: dict[str, Hyper] | None = None, budget: Budget | None = None) -> str:
    """Each architecture's hyperparameters, the sweep's choice (``choice``: the shipped one by
    default), one line each in the grid's order; "" before the sweep has chosen."""
    choice = choice if choice is not None else sweep.read_choice()
    floor = (budget or Budget()).min_steps
    lines = [f"- {ARCH_LABELS[a]}: peak learning rate {h.lr:g}, weight decay "
             f"{h.weight_decay:g}, augmentation {h.augmentation()}, at least "
             f"{round(h.floor * floor):,} steps" for a in ARCH_LABELS if (h := choice.get(a))]
    if not lines:
        return ""
    return ("**Each architecture's recipe** (the sweep's choice, on validation images; "
            "`explorer/lab/sweep.py`):\n" + "\n".join(lines))


def summary_text(rows: list[dict]) -> str:
    """What the grid shows, in words, computed from its rows: the winner at each size, how
    the ViT's and the CoAtNet's gaps to the CNN move with data, how far apart seeds land,
    and the paper's data scale beside it."""
    curves = analysis.error_vs_data(rows)
    if not curves:
        return NO_GRID
    sentences = [analysis.winners_sentence(curves), analysis.gap_sentence(curves, "vit"),
                 analysis.gap_sentence(curves, "coatnet"), analysis.seed_sentence(rows),
                 PAPER_SCALE]
    return " ".join(s for s in sentences if s)


def scrambled_text(rows: list[dict]) -> str:
    """The wrong-bias experiment in words: the framing, then where the scrambled runs land."""
    found = analysis.scramble_sentence(rows)
    return SCRAMBLED_INTRO + " " + (found or "*No scrambled run has finished yet.*")


def convergence_text(rows: list[dict]) -> str:
    """The convergence check over the architecture grid's finished runs, naming those that
    fail it. The size sweep's runs (other widths; fixed budgets of a quarter, a half, ... of
    the steps) are frontier points, short on purpose: the rule does not apply to them
    (`LabRun.in_arch_grid`), and the sentence says how many it leaves out."""
    checked = [r for r in rows if LabRun.of(r).in_arch_grid]
    exempt, rows = len(rows) - len(checked), checked
    if not rows:
        return ""
    checks = [(r, analysis.convergence(r)) for r in rows]
    failed = [(r, c) for r, c in checks if not c.converged]
    text = (f"**Convergence check** (validation accuracy gains < "
            f"{100 * analysis.MAX_LATE_GAIN:.1f} points in the last "
            f"{100 * analysis.LAST_SHARE:.0f}% of training, read from a line fitted through "
            f"its evaluations, and train ≥ test accuracy): "
            f"{len(rows) - len(failed)} of {len(rows)} finished runs pass")
    if exempt:
        text += (f" (the size sweep's {exempt} finished run{'s' if exempt > 1 else ''}, "
                 f"trained to fixed budgets on purpose, {'are' if exempt > 1 else 'is'} "
                 f"not checked)")
    if not failed:
        return text + "."
    names = [f"{analysis.run_label(r)} (gain {100 * c.late_gain:+.1f}, train − test "
             f"{100 * c.train_minus_test:+.1f})" for r, c in failed[:6]]
    more = f" and {len(failed) - 6} more" if len(failed) > 6 else ""
    text += "; not: " + "; ".join(names) + more + "."
    # a finished row that fails is one the rule gave up on: say so, from its attempt
    last = Budget().max_attempts - 1
    if all(r["attempt"] >= last for r, _ in failed):
        text += (f" {'Each' if len(failed) > 1 else 'It'} failed at the rule's last attempt "
                 f"({2 ** last}× the steps) and is kept as it is: the rule trains no longer.")
    return text


def longer_text(rows: list[dict], attempts: list[dict]) -> str:
    """What training again bought the finished runs the rule retrained: how many, and the
    change in test accuracy from the first attempt to the kept one (range and median), then,
    folded (a list that grows with the grid), each run's attempts with their steps and test
    accuracy ("" when no finished run was retrained)."""
    earlier: dict[str, list[dict]] = {}
    for a in attempts:
        earlier.setdefault(grid.work_key(LabRun.of(a)), []).append(a)
    lines, changes = [], []
    for r in rows:
        tried = sorted(earlier.get(grid.work_key(LabRun.of(r)), []),
                       key=lambda a: a["attempt"])
        if not tried:
            continue
        steps = " → ".join(f"{a['steps']:,} steps {100 * a['test_acc']:.2f}%"
                           for a in tried + [r])
        lines.append(f"- {analysis.run_label(r)}: {steps}")  # seeds apart: one line each
        changes.append(100 * (r["test_acc"] - tried[0]["test_acc"]))
    if not lines:
        return ""
    n = len(lines)
    change = (f"tests {changes[0]:+.2f} points against its first" if n == 1 else
              f"tests {min(changes):+.2f} to {max(changes):+.2f} points against the first "
              f"(median {float(np.median(changes)):+.2f})")
    # (not "until the check passed": a run still gaining at 4× its steps is kept as it is)
    return (f"**Trained again by the rule:** {n} finished run{'s' * (n > 1)} trained again "
            f"from scratch with twice the steps (up to {2 ** (Budget().max_attempts - 1)}×) "
            f"after an attempt that had not converged; the kept attempt {change}. The check "
            "stops a run on a flat validation curve; a longer run need not test better."
            "\n\n<details><summary>Each retrained run's attempts (steps and test accuracy; "
            "the last is kept)</summary>\n\n" + "\n".join(lines) + "\n\n</details>")


def _pending(rows: list[dict], done: Collection[str]) -> dict[str, dict]:
    """Each run of ``rows`` whose grid row has not landed (its key not in ``done``), by key:
    its last attempt's row."""
    latest: dict[str, dict] = {}
    for r in rows:
        key = grid.row_key(r)
        if key not in done and r["attempt"] >= latest.get(key, {"attempt": -1})["attempt"]:
            latest[key] = r
    return latest


def retrain_text(attempts: list[dict], done: list[str]) -> str:
    """The runs training again because an attempt had not converged (its numbers and why);
    "" for none. ``done``: the grid's finished run keys (their last attempt is in the grid)."""
    latest = _pending(attempts, done)
    if not latest:
        return ""
    lines = []
    for r in latest.values():
        why = analysis.failed_checks(analysis.convergence(r))
        again = replace(LabRun.of(r), attempt=r["attempt"] + 1)  # its next attempt
        lines.append(f"{analysis.run_label(r)}: {r['steps']:,} steps reached "
                     f"{100 * r['test_acc']:.1f}% test accuracy, but not converged "
                     f"({'; '.join(why)}), so it trains again from scratch with "
                     f"{run_steps(again, Budget(), sweep.hyper_for(r['arch'])):,} steps")
    return ("**Training longer** (attempts that had not converged, kept aside and not "
            "plotted): " + "; ".join(lines) + ".")


def superseded_runs(superseded: Sequence[dict], done: Collection[str]) -> dict[str, list[dict]]:
    """Per architecture (the grid's order), its runs that train again because the sweep
    changed its choice (`grid.supersede`), one row each (the last attempt), while their new
    row has not landed."""
    by_arch: dict[str, list[dict]] = {}
    for r in _pending(superseded, done).values():
        by_arch.setdefault(r["arch"], []).append(r)
    return {a: by_arch[a] for a in ARCH_LABELS if a in by_arch}


def _change(old: Hyper, new: Hyper) -> str:
    """What a new sweep choice changed, in words: "augmentation none → 2-px shifts, flips"."""
    floor = Budget().min_steps
    parts = [f"{what} {a} → {b}" for what, a, b in (
        ("learning rate", f"{old.lr:g}", f"{new.lr:g}"),
        ("weight decay", f"{old.weight_decay:g}", f"{new.weight_decay:g}"),
        ("augmentation", old.augmentation(), new.augmentation()),
        ("step floor", f"{round(old.floor * floor):,}", f"{round(new.floor * floor):,}"))
        if a != b]
    return "; ".join(parts)


def superseded_text(superseded: list[dict], done: list[str],
                    choice: dict[str, Hyper] | None = None) -> str:
    """Which architectures train again with the sweep's new choice, what it changed and how
    many of their runs are still to land; "" for none."""
    runs = superseded_runs(superseded, done)
    if not runs:
        return ""
    choice = choice if choice is not None else sweep.read_choice()
    latest = {r["arch"]: Hyper.of(r) for r in superseded}  # the last choice each replaced
    parts = []
    for arch, rows in runs.items():
        change = _change(latest[arch], choice[arch]) if arch in choice else ""
        parts.append(f"{ARCH_LABELS[arch]}, {len(rows)} run{'s' * (len(rows) != 1)}"
                     + (f" ({change})" if change else ""))
    return ("**Training again with the sweep's new choice:** " + "; ".join(parts)
            + ". A re-run of the sweep (`explorer/lab/sweep.py`) changed these architectures' "
            "hyperparameters; their earlier rows are kept in `assets/lab/superseded.csv` and "
            "not plotted.")


def _the(labels: list[str]) -> str:
    """Architectures' labels as a list in words: "the CNN", "the CNN and the ViT", "the CNN,
    the ViT and the CoAtNet"."""
    return analysis.and_list([f"the {label}" for label in labels])


def _labels(archs: Collection[str]) -> list[str]:
    """The labels of ``archs``, in the grid's order."""
    return [ARCH_LABELS[a] for a in ARCH_LABELS if a in archs]


STAGES = {"sweep-lr": "learning-rate", "sweep-aug": "augmentation", "sweep-floor": "step-floor",
          "sweep-wd": "weight-decay", "sweep-lr-full": "full-budget learning-rate"}


def sweep_text(left: dict[str, list] | None = None) -> str:
    """The sweep's stages still training (``left``: `grid.sweep_left`'s, by default read from
    disk), with their architectures; "" for none."""
    left = left if left is not None else grid.sweep_left()
    if not left:
        return ""
    parts = []
    for phase, items in left.items():
        archs = {run.arch for run, _ in items}
        parts.append(f"its {STAGES[phase]} stage has {len(items)} run{'s' * (len(items) != 1)} "
                     f"to train ({', '.join(_labels(archs))})")
    return ("**The sweep is choosing again:** " + "; ".join(parts) + ". The grid waits for it; "
            "an architecture whose choice changes trains again, and until then the plots show "
            "its runs under the current choice.")


def progress_text(status: dict[str, list] | None = None,
                  attempts: list[dict] | None = None,
                  superseded: list[dict] | None = None,
                  choice: dict[str, Hyper] | None = None,
                  sweep_left: dict[str, list] | None = None) -> str:
    """How far the grid is: finished, training now (with their step), queued, which sweep
    stages still train (`sweep_text`), and which runs train again because an attempt had not
    converged or the sweep changed its choice (``choice``: the shipped one by default)."""
    status = status if status is not None else grid.status()
    attempts = attempts if attempts is not None else attempt_rows()
    superseded = superseded if superseded is not None else superseded_rows()
    done, training, todo = status["done"], status["training"], status["todo"]
    total = len(done) + len(training) + len(todo)
    if not training and not todo:
        return f"All {total} grid runs have finished."
    now = ", ".join(f"{key} (step {step:,} of {steps:,})" for key, step, steps in training)
    text = (f"**The grid is still training:** {len(done)} of {total} runs finished; "
            + (f"part-trained (a checkpoint, resumed in its turn): {now}; " if now else "")
            + f"{len(todo)} queued. The plots "
            "show the finished runs; a missing point is still to come (`python -m "
            "explorer.lab.grid` resumes it).")
    notes = [sweep_text(sweep_left), retrain_text(attempts, done),
             superseded_text(superseded, done, choice)]
    return "\n\n".join([text] + [n for n in notes if n])


SCALING_HEADING = "Best ViT width within each compute budget"


def scaling_lines(rows: list[dict], attempts: Sequence[dict] = ()) -> list[str]:
    """Which ViT size is best at a few compute budgets, one line per data size, from the
    grid's rows and the ``attempts`` the rule trained before them (each a complete run, from
    scratch, at its own budget: a point of the frontier like any other)."""
    curves = analysis.compute_curves(rows, attempts)
    lines = []
    for n in sorted({c.train_images for c in curves}):
        group = [c for c in curves if c.train_images == n]
        budgets = np.geomspace(min(min(c.compute) for c in group),
                               max(max(c.compute) for c in group), 4)
        best = analysis.best_per_budget(group, budgets)
        steps = "; ".join(f"within {si(b)}, {w}" for b, w in zip(budgets, best, strict=True))
        lines.append(f"- {n:,} images, the best width within a budget of training FLOPs: "
                     f"{steps}{_sweep_so_far(rows, n)}")
    return lines


def _sweep_so_far(rows: list[dict], train_images: int) -> str:
    """How many of the size sweep's runs on ``train_images`` images the best widths are
    chosen from, while some are still training ("" once all have finished): a width not yet
    trained to a budget cannot be the best within it."""
    planned = {r.name for r in grid.grid_runs() if r.arch == "vit" and r.seed == 0
               and r.variant == "original" and r.train_images == train_images
               and r.width in grid.SWEEP_WIDTHS and r.budget in grid.SWEEP_BUDGETS}
    done = len(planned & {grid.row_key(r) for r in rows})
    if not planned or done == len(planned):
        return ""
    # short: on a projector (lecture step 8) the line must fit beside the figure
    return f" (from {done} of the sweep's {len(planned)} runs so far)"


def scaling_text(rows: list[dict], attempts: Sequence[dict] = ()) -> str:
    """`scaling_lines` under a heading, for the tab ("" without a size sweep)."""
    lines = scaling_lines(rows, attempts)
    return f"**{SCALING_HEADING}**\n" + "\n".join(lines) if lines else ""


def still_training(rows: list[dict], superseded: list[dict] = (),
                   sweep_left: dict[str, list] | None = None) -> str:
    """How much of the grid the rows are, while it is not all there ("" when it is), which
    architectures the sweep is choosing for again (``sweep_left``: `grid.sweep_left`'s) and
    which train again with its new choice (`superseded_runs`)."""
    names = [r.name for r in grid.grid_runs()]
    done = {grid.row_key(r) for r in rows}
    finished = len(done & set(names))
    if finished == len(names):
        return ""
    again = [ARCH_LABELS[a] for a in superseded_runs(superseded, done)]
    again_text = (f"{_the(again)} train{'s' * (len(again) == 1)} again with the sweep's new "
                  "hyperparameters; ") if again else ""
    choosing = {run.arch for items in (sweep_left or {}).values() for run, _ in items}
    choosing_text = (f"the sweep is choosing again for {_the(_labels(choosing))}, whose runs "
                     "may train again; ") if choosing else ""
    # not "the figure shows those": a figure may show none of them yet (the size sweep's)
    return (f"*(still training: {finished} of the grid's {len(names)} runs have finished; "
            f"{choosing_text}{again_text}what is shown here comes from those alone)*")


def lecture_note(figure: str, rows: list[dict], superseded: list[dict] | None = None,
                 sweep_left: dict[str, list] | None = None,
                 attempts: list[dict] | None = None) -> str:
    """What the Lecture's lab steps add under their text: the grid's findings for the figure
    shown (`explorer.lecture.Step.figure`), computed from its rows, and how much of the grid
    they are (``superseded``: `superseded_rows`, ``sweep_left``: `grid.sweep_left`,
    ``attempts``: `attempt_rows`, all read from disk by default); "" for other figures."""
    # the runs behind a sentence's points that the rule stopped unconverged, after it
    if figure == "lab-data":
        found = [summary_text(rows), analysis.scramble_sentence(rows),
                 analysis.unconverged_sentence(rows)]
    elif figure == "lab-compute":
        lines = scaling_lines(rows, attempts if attempts is not None else attempt_rows())
        found = [f"{SCALING_HEADING}:\n" + "\n".join(lines) if lines else ""]
    elif figure == "lab-bias":
        found = [analysis.gap_sentence(analysis.error_vs_data(rows), "coatnet", "vit"),
                 analysis.unconverged_sentence(rows, ("coatnet", "vit"), ("original",))]
    else:
        return ""
    # how much of the grid this is comes first: a projector shows the note's first lines only
    superseded = superseded if superseded is not None else superseded_rows()
    sweep_left = sweep_left if sweep_left is not None else grid.sweep_left()
    found = [f for f in [still_training(rows, superseded, sweep_left) if rows else ""] + found
             if f]
    return ("\n\n**Trained here:** " + " ".join(found)) if found else ""


def live_message(result, rows: list[dict], run: LabRun, budget: Budget) -> str:
    """A finished live run in words, beside the grid's run of the same architecture, images
    and seed, and what its shorter budget cost."""
    message = (f"**Done in {result.seconds:.0f} s: test accuracy {100 * result.test_acc:.2f}%** "
               f"(train {100 * result.train_acc:.1f}%, {result.steps:,} steps).")
    shipped = [r for r in analysis.seed_runs(rows, run.arch, run.train_images)
               if r["seed"] == run.seed]
    if budget == Budget():
        if shipped:
            message += f" The grid has {100 * shipped[0]['test_acc']:.2f}% for this run."
        return message
    message += (f" A live run is cut to {result.steps:,} steps; the grid trains this run for "
                f"{run_steps(run, Budget(), sweep.hyper_for(run.arch)):,}")
    if shipped:
        diff = 100 * (shipped[0]["test_acc"] - result.test_acc)
        message += (f" and reaches {100 * shipped[0]['test_acc']:.2f}% "
                    f"({diff:+.1f} points against the live run)")
    return message + "."


# (width and depth are in the run's name: w64-d4)
RUN_HEADERS = ("run", "model", "params", "data", "images", "steps", "epochs", "min",
               "device", "seed", "train %", "val %", "test %", "late gain", "converged")


def run_name(row: dict) -> str:
    """A row's run, attempt included (`LabRun.name`: "vit-w64-d4-n60000-s0-a1": width 64,
    depth 4, 60,000 images, seed 0, second attempt)."""
    return LabRun.of(row).name


def runs_table(rows: list[dict], attempts: list[dict]) -> list[list]:
    """Every finished run and every attempt the rule retrained, one line each (`RUN_HEADERS`),
    in the grid's order of architectures, then data, size, seed and attempt."""
    order = {a: i for i, a in enumerate(ARCH_LABELS)}

    def key(entry: tuple[dict, bool]) -> tuple:
        r = entry[0]
        return (order[r["arch"]], r["variant"], r["budget"], r["width"], r["train_images"],
                r["seed"], r["attempt"])

    lines = []
    for row, retrained in sorted([(r, False) for r in rows] + [(r, True) for r in attempts],
                                 key=key):
        c = analysis.convergence(row)
        verdict = "yes" if c.converged else "no: trained again" if retrained else "no"
        lines.append([run_name(row), ARCH_LABELS[row["arch"]], row["params"],
                      row["variant"], row["train_images"], row["steps"],
                      round(row["epochs"], 1), round(row["seconds"] / 60, 1),
                      row.get("device", "cpu").upper().replace("CUDA", "GPU"), row["seed"],
                      round(100 * row["train_acc"], 2), round(100 * row["val_acc"], 2),
                      round(100 * row["test_acc"], 2), round(100 * c.late_gain, 2), verdict])
    return lines


def runs_count(rows: list[dict], attempts: list[dict]) -> str:
    """How many lines `runs_table` has, in words: "9 finished runs and 2 retrained attempts
    so far" ("so far" while the grid is still training)."""
    def count(n: int, what: str) -> str:
        return f"{n:,} {what}{'' if n == 1 else 's'}"

    text = count(len(rows), "finished run")
    if attempts:
        text += f" and {count(len(attempts), 'retrained attempt')}"
    return text + (" so far" if still_training(rows) else "")


def run_title(row: dict) -> str:
    """A run's curve's title: what it is and what the convergence rule read from the curve."""
    c = analysis.convergence(row)
    variant = ", scrambled" if row["variant"] == "scrambled" else ""
    return (f"{ARCH_LABELS[row['arch']]} (w{row['width']}, d{row['depth']}), "
            f"{row['train_images']:,} images{variant}, seed {row['seed']}, "
            f"{row['steps']:,} steps<br><sup>late gain {100 * c.late_gain:+.2f} points "
            f"(< {100 * analysis.MAX_LATE_GAIN:.1f} to converge), train − test "
            f"{100 * c.train_minus_test:+.1f}: {'converged' if c.converged else 'not converged'}"
            "</sup>")
