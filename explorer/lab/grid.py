"""The shipped result grid (`assets/lab/grid.csv`): what runs it holds, how to regenerate it,
how to read it.

    python -m explorer.lab.grid --workers 2     # resumes: finished runs are skipped,
                                                # unfinished ones continue from their checkpoint
    python -m explorer.lab.grid --status        # what is done, training, still to do

Six phases, in order: the hyperparameter sweep's five stages (`explorer.lab.sweep`, rows in
`assets/lab/sweep.csv`, its choice in `assets/lab/hyper.json`), then the grid (`grid_runs`):
every architecture at every data size with two seeds, the scrambled variant at three sizes
with two seeds, and the ViT size sweep (four widths, each trained to three budgets), ordered so
that a partial grid is already a picture (the relative model the tab's relative view loads,
then the CNN and the ViT at every size, smallest first,
original and scrambled, then the other architectures, the size sweep, the other
architectures scrambled; seed 0 before seed 1).
``--workers N`` starts N processes, the cores shared out as torch threads (two workers on the
2-vCPU machine take one each; a last run left alone trains faster with ``--workers 1``, on
both); each takes the next run nobody has claimed, trains it with a checkpoint in
`assets/lab/checkpoints/` every two minutes of training, appends its row when done and
deletes the checkpoint. Commit `assets/lab/` to carry a grid in progress to another machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from statistics import median

from explorer.lab import sweep
from explorer.lab.analysis import convergence
from explorer.lab.engine import Budget, Hyper, LabResult, LabRun, machine_id, on_cpu_alone, run_steps
from explorer.lab.models import LAB_ARCHS
from explorer.lab.paths import ATTEMPTS_CSV, CHECKPOINTS_DIR, GRID_CSV, SUPERSEDED_CSV, SWEEP_CSV
from explorer.training import pause_on_sigtstp
from explorer.tuning import keep_freed_memory, threads_per_request

DATA_SIZES = (500, 1200, 3000, 7500, 20000, 60000)
SEEDS = (0, 1)
SCRAMBLED_SIZES = (500, 3000, 20000)
SWEEP_WIDTHS = (32, 48, 64, 96)  # ViT widths (depth 4, 16-dim heads) of the scaling view
SWEEP_SIZE = 20000
SWEEP_BUDGETS = (0.25, 0.5, 1.0)  # shares of the budget rule's steps
COMPILED_ARCHS = ("vit", "vit_rel")  # trained through torch.compile (`_train_one`)
# fp32 on every device (no bf16 autocast on a GPU): the grid's rows compare whichever machine
# trained them, and these 0.2 M-parameter models gain nothing from half precision. (The
# tab's live run follows the app's rule instead, "auto": one precision per process.)
GRID_PRECISION = "no"
KEEP_MODELS = {(arch, n) for arch in LAB_ARCHS for n in (1200, 60000)}  # seed 0, default size
REL_VIEW_SIZE = 1200  # the smallest kept relative model, the first the grid trains
COLUMNS = tuple(f.name for f in fields(LabResult) if f.name != "model")
_INTS = ("width", "depth", "params", "flops", "train_images", "fit_images", "val_images",
         "attempt", "steps", "batch", "shift", "seed")
_FLOATS = ("budget", "epochs", "lr", "weight_decay", "floor", "seconds", "train_acc", "val_acc",
           "test_acc")


def grid_runs() -> list[LabRun]:
    """Every grid run, in the order they are trained."""
    # the lecture's comparison first: CNN against ViT at every size, original and scrambled;
    # then the other two architectures. Smallest sizes first: a 60,000-image run is hours
    # (more when the rule trains it again), a 500-image one minutes, so a partial grid has
    # the whole curve but its last point rather than one point
    # the relative model the tab's step-9 view loads goes before them: without it that view
    # is empty, and it is one short run (the floor's steps on 1,200 images)
    runs = [LabRun("vit_rel", REL_VIEW_SIZE, 0)]
    runs += [LabRun(a, n, 0) for n in DATA_SIZES for a in ("cnn", "vit")]
    runs += [LabRun(a, n, 0, variant="scrambled") for n in SCRAMBLED_SIZES for a in ("cnn", "vit")]
    runs += [LabRun(a, n, 0) for n in DATA_SIZES for a in LAB_ARCHS]
    # then the size sweep (under 2 core-hours), so that each Lecture step's figure (7: the
    # architectures, 8: the sweep, 9: the relative model) has its first seed before the
    # rest of the scrambled runs and the second seed add to the tab's
    runs += [LabRun("vit", SWEEP_SIZE, 0, width=w, budget=b) for b in SWEEP_BUDGETS
             for w in SWEEP_WIDTHS]
    runs += [LabRun(a, n, 0, variant="scrambled") for n in SCRAMBLED_SIZES for a in LAB_ARCHS]
    # then the second seeds, smallest size first across both variants (original, then
    # scrambled at each size): the scrambled experiment's seeds are a few core-hours and
    # need not wait behind the 60,000-image runs' many
    runs += [LabRun(a, n, s, variant=v) for s in SEEDS[1:] for n in sorted(DATA_SIZES)
             for v in ("original", "scrambled") for a in LAB_ARCHS
             if v == "original" or n in SCRAMBLED_SIZES]
    unique, seen = [], set()
    for r in runs:
        if r.name not in seen:
            unique.append(r)
            seen.add(r.name)
    return unique


def work_key(run: LabRun, hyper: Hyper | None = None) -> str:
    """A run's name without its attempt (the grid holds one row per run: its last attempt),
    plus its hyperparameters for sweep runs (several per run)."""
    name = replace(run, attempt=0).name
    if hyper is None:
        return name
    aug = f"-shift{hyper.shift}" + ("-flip" if hyper.flip else "")
    floor = f"-floor{hyper.floor:g}" if hyper.floor != 1.0 else ""
    return f"{name}-lr{hyper.lr:g}-wd{hyper.weight_decay:g}{aug}{floor}"


def row_key(row: dict, with_hyper: bool = False) -> str:
    if not with_hyper:
        return work_key(LabRun.of(row))
    return work_key(LabRun.of(row), Hyper.of(row))


def read_grid(path: Path = GRID_CSV) -> list[dict]:
    """The rows of a grid (or sweep) CSV, typed (``curve`` as a list of (step, val, train))."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            row.setdefault("attempt", "0")  # files written before runs were retried
            row.setdefault("floor", "1.0")  # files written before the sweep chose floors
            row.setdefault("device", "cpu")  # files written before a GPU trained any run
            for k in _INTS:
                row[k] = int(row[k])
            for k in _FLOATS:
                row[k] = float(row[k])
            row["flip"] = row["flip"] == "True"
            row["curve"] = [tuple(p) for p in json.loads(row["curve"])]
            rows.append(row)
    return rows


def append_row(result: LabResult, path: Path = GRID_CSV) -> None:
    """Append one finished run (one short write: several workers share the file)."""
    new = not path.is_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    row = result.row()
    row["curve"] = json.dumps([[s, round(v, 4), round(t, 4)] for s, v, t in row["curve"]])
    columns = COLUMNS
    if not new:  # keep the file's own columns (a file from before a column was added)
        with open(path, newline="") as f:
            columns = tuple(next(csv.reader(f)))
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: row[k] for k in columns})


# ---------------------------------------------------------------------------------------
# Work: phases, claims, status
# ---------------------------------------------------------------------------------------

PHASES = (*sweep.STAGES, "grid")


def phase_work(phase: str) -> tuple[Path, list[tuple[LabRun, Hyper | None]]]:
    """The CSV a phase writes and its runs (with hyperparameters for the sweep's)."""
    if phase in sweep.STAGES:
        return SWEEP_CSV, sweep.STAGES[phase](read_grid(SWEEP_CSV))
    if phase == "grid":
        return GRID_CSV, [(r, None) for r in grid_runs()]
    raise ValueError(f"phase must be one of {PHASES}")


def _finished(phase: str, path: Path) -> set[str]:
    """The keys (`work_key`) of the phase's runs with a row in ``path``."""
    return {row_key(r, with_hyper=phase != "grid") for r in read_grid(path)}


def unfinished(phase: str) -> tuple[Path, list[tuple[LabRun, Hyper | None]]]:
    """The CSV a phase writes and its runs (`phase_work`) with no row there yet, in order."""
    path, items = phase_work(phase)
    done = _finished(phase, path)
    return path, [(run, hyper) for run, hyper in items if work_key(run, hyper) not in done]


def sweep_left() -> dict[str, list[tuple[LabRun, Hyper | None]]]:
    """The sweep's stages with runs still to train (`unfinished`; the grid waits for them),
    in order; a stage that moves on while it gains (the learning rate's, the floor's, the
    weight decay's) may add runs."""
    return {phase: items for phase in PHASES[:-1] if (items := unfinished(phase)[1])}


def checkpoint_path(run: LabRun, sweep_hyper: Hyper | None = None) -> Path:
    """Where an unfinished run keeps its checkpoint: named by the run (attempt included), a
    sweep run's with its hyperparameters."""
    name = run.name if sweep_hyper is None else work_key(run, sweep_hyper)
    return CHECKPOINTS_DIR / f"{name}.pt"


def next_attempts() -> dict[str, int]:
    """For each grid run that does not start at its first attempt, the attempt it trains
    next: the one after its attempts that did not converge, and a later seed's first at the
    attempt its seed 0 kept. A second seed is a replicate of the first's recipe, steps
    included: so the seeds' spread is theirs, not two budgets', and a run whose seed 0 needed
    twice the steps does not spend a first attempt finding that out again."""
    out: dict[str, int] = {}
    for r in read_grid(GRID_CSV):
        run = LabRun.of(r)
        if run.seed == 0 and run.attempt and run.in_arch_grid:
            for seed in SEEDS[1:]:
                out[work_key(replace(run, seed=seed))] = run.attempt
    for r in read_grid(ATTEMPTS_CSV):
        out[row_key(r)] = max(out.get(row_key(r), 0), r["attempt"] + 1)
    return out


def replicates_waiting(items: list[tuple[LabRun, Hyper | None]]) -> set[str]:
    """The keys of the unfinished grid runs ``items`` that wait for their seed 0's row, which
    sets the attempt they start at (`next_attempts`): later seeds of a run still among
    ``items``."""
    keys = {work_key(run) for run, _ in items}
    return {work_key(run) for run, _ in items
            if run.seed and run.in_arch_grid and work_key(replace(run, seed=0)) in keys}


def _claim(key: str) -> bool:
    CHECKPOINTS_DIR.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(CHECKPOINTS_DIR / f"{key}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    return True


def _release(key: str) -> None:
    (CHECKPOINTS_DIR / f"{key}.claim").unlink(missing_ok=True)


def _held(key: str) -> bool:
    """Whether a live worker holds ``key``'s claim (is training it now)."""
    try:
        os.kill(int((CHECKPOINTS_DIR / f"{key}.claim").read_text().split()[0]), 0)
    except (FileNotFoundError, ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def status(budget: Budget | None = None) -> dict[str, list]:
    """The grid's progress: ``done`` row keys, ``training`` as (key, step, steps) from the
    checkpoints on disk (begun runs: in a worker now, or waiting to resume), ``running`` the
    keys of those a live worker holds now, ``todo`` keys, in training order; and ``here``, as
    (key, steps, seconds), what each run in ``training`` has trained on this machine since
    its latest start (`engine.run_lab`'s ``starts``; none where it last started elsewhere)."""
    import torch

    budget = budget or Budget()
    chosen = sweep.read_choice()
    done = {row_key(r) for r in read_grid(GRID_CSV)}
    training, running, todo, here = [], [], [], []
    attempts = next_attempts()
    for run in grid_runs():
        if run.name in done:
            continue
        run = replace(run, attempt=attempts.get(run.name, 0))
        ckpt = checkpoint_path(run)
        if ckpt.is_file():
            # memory-mapped: reads the step, not the weights and optimiser state
            state = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
            step = int(state["step"])
            training.append((run.name, step,
                             run_steps(run, budget, chosen.get(run.arch, Hyper()))))
            if _held(work_key(run)):
                running.append(run.name)
            starts = state.get("extra", {}).get("starts") or [{}]
            if starts[-1].get("machine") == machine_id():
                here.append((run.name, step - starts[-1]["step"],
                             float(state["seconds"]) - starts[-1]["seconds"]))
        else:
            todo.append(run.name)
    return {"done": sorted(done), "training": training, "running": running, "todo": todo,
            "here": here}


def remaining_seconds(progress: dict[str, list], rows: list[dict], sweep_rows: list[dict] = (),
                      budget: Budget | None = None, flops=None,
                      sweep_left: dict[str, list] | None = None) -> float | None:
    """One core's seconds of training left in ``progress`` (`status`) and in the sweep's
    stages ``sweep_left`` (`sweep_left`: their runs, whole), at the speeds of the finished
    ``rows`` (grid rows and attempts): each architecture's median seconds per step and
    forward FLOP, times each unfinished run's steps left and its FLOPs. An architecture with
    no finished grid run is timed by its sweep runs (``sweep_rows``), scaled by the median
    grid/sweep ratio of those with both (the sweep's short runs ran slower per step). First
    attempts only: a run that does not converge trains again with twice the steps. None when
    an architecture left has no run at all to time it by.

    Args:
        flops: the forward FLOPs of a run (`engine.forward_flops` of its model by default).
    """
    budget = budget or Budget()
    flops = flops or _run_flops
    chosen = sweep.read_choice()
    rate, swept = _rates(rows), _rates(sweep_rows)
    both = [rate[a] / swept[a] for a in rate if a in swept]
    for a in swept.keys() - rate.keys():
        if both:
            rate[a] = swept[a] * median(both)
    runs = _runs_by_name(budget)
    left = [(run, run_steps(run, budget, chosen.get(run.arch, Hyper())))
            for run in (runs[name] for name in progress["todo"])]
    left += [(runs[name], steps - step) for name, step, steps in progress["training"]]
    left += [(run, run_steps(run, sweep.phase_budget(phase), hyper))
             for phase, items in (sweep_left or {}).items() for run, hyper in items]
    if any(run.arch not in rate for run, _ in left):
        return None
    return sum(steps * flops(run) * rate[run.arch] for run, steps in left)


def _runs_by_name(budget: Budget) -> dict[str, LabRun]:
    """Every grid run at each of its attempts, by the name `status` gives it."""
    return {replace(r, attempt=a).name: replace(r, attempt=a) for r in grid_runs()
            for a in range(budget.max_attempts)}


def _rates(rows: list[dict]) -> dict[str, float]:
    """Each architecture's median seconds per step and forward FLOP over ``rows`` trained on
    a CPU alone (a core's speed: a GPU's rows would make it a mix of machines)."""
    per: dict[str, list[float]] = {}
    for r in rows:
        if not on_cpu_alone(r):
            continue
        per.setdefault(r["arch"], []).append(r["seconds"] / (r["steps"] * r["flops"]))
    return {a: median(v) for a, v in per.items()}


HERE_MIN_STEPS = 200  # fewer steps since a start than this time nothing (compiling, warm-up)


def machine_factor(progress: dict[str, list], rows: list[dict], flops=None) -> float | None:
    """How many times the finished ``rows``' speeds this machine takes per step: the median,
    over the runs in flight that have trained at least `HERE_MIN_STEPS` steps here since
    their latest start (``progress["here"]``, `status`), of their seconds per step here over
    what their architecture's rate (`remaining_seconds`) predicts. Above 1: slower than the
    rows' machines. None when no run in flight has trained here long enough. Time spent
    beside other work counts, as it does in the rows; time paused with ``kill -TSTP`` does
    not (`training.pause_on_sigtstp`), a plain SIGSTOP's does."""
    flops = flops or _run_flops
    rate = _rates(rows)
    runs = _runs_by_name(Budget())
    ratios = [seconds / steps / (rate[runs[name].arch] * flops(runs[name]))
              for name, steps, seconds in progress.get("here", ())
              if steps >= HERE_MIN_STEPS and runs[name].arch in rate]
    return median(ratios) if ratios else None


_FLOPS: dict[str, int] = {}


def _run_flops(run: LabRun) -> int:
    from explorer.lab.engine import forward_flops
    from explorer.lab.models import build

    if run.spec.name not in _FLOPS:
        _FLOPS[run.spec.name] = forward_flops(build(run.spec, seed=0))
    return _FLOPS[run.spec.name]


def _keep_model(run: LabRun) -> bool:
    default = LabRun(run.arch, run.train_images)
    return ((run.arch, run.train_images) in KEEP_MODELS and run.seed == 0
            and run.variant == "original" and run.budget == 1.0
            and (run.width, run.depth) == (default.width, default.depth))


# Set by a worker process's SIGTERM or SIGINT (`main --phase`): its run saves its checkpoint
# at the next step and the worker takes no other run. A stopped grid then loses no training
# (a kill loses up to `Budget.checkpoint_every_s`).
STOP = threading.Event()


def _train_one(run: LabRun, hyper: Hyper, budget: Budget, checkpoint: Path) -> LabResult | None:
    from explorer.lab.engine import train

    def report(event, seconds):
        if event.val_acc is not None:
            print(f"  {checkpoint.stem} step {event.step}/{event.total_steps} val "
                  f"{event.val_acc:.4f} train {event.train_acc:.4f} ({seconds:.0f}s)", flush=True)

    from explorer.models import default_device

    # the fastest step measured for each architecture on the CPU (BENCHMARKS.md, "The
    # training step"): the ViTs compiled (1.05–1.12×), the CNN and CoAtNet eager in the
    # channels-last layout (`engine.LAYOUT`), which beat their compiled step (CoAtNet by
    # 1.18×). The loop core trains eagerly where compiling fails (no C++ compiler). On a GPU
    # every run trains eagerly: there a run of these tiny models is a minute or two, about
    # what compiling it would take (not measured: no GPU was lent)
    compiled = run.arch in COMPILED_ARCHS and default_device().type == "cpu"
    return train(run, budget, hyper, checkpoint=checkpoint, on_event=report,
                 compile=compiled, cancel=STOP, mixed_precision=GRID_PRECISION)


# A worker of every sweep stage at once (the driver's default): it takes the earliest stage's
# next run, so a core never idles at a stage's end while the next stage has runs it can
# train (a later stage's runs for an architecture appear once the earlier has chosen for it).
SWEEP = "sweep"
WAIT_S = 30.0  # a sweep worker with nothing to claim, while others train: its wait to look again


def _next(phase: str) -> tuple[str, Path, LabRun, Hyper | None] | None:
    """The next unfinished run of ``phase`` (of every sweep stage, earliest first, for
    `SWEEP`) that this worker could claim: (its stage, that stage's CSV, the run, its sweep
    hyperparameters); None when there is none."""
    for stage in PHASES[:-1] if phase == SWEEP else (phase,):
        path, items = unfinished(stage)
        waiting = replicates_waiting(items) if stage == "grid" else set()
        for run, hyper in items:
            if work_key(run, hyper) not in waiting and _claim(work_key(run, hyper)):
                return stage, path, run, hyper
    return None


def fp32_everywhere() -> None:
    """`GRID_PRECISION` on a GPU too: cuDNN runs fp32 convolutions in TF32 (a 10-bit
    mantissa) unless told not to, and the CNN's and CoAtNet's are most of their FLOPs.
    Matrix products are IEEE fp32 by torch's default; said here all the same."""
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def work(phase: str, limit: int | None = None, budget: Budget | None = None,
         threads: int = 1) -> int:
    """One worker: train the phase's unclaimed, unfinished runs one after another (for
    `SWEEP`, every stage's; with nothing to claim while other workers' runs may add runs to a
    stage, it waits and looks again), on ``threads`` torch threads."""
    import torch

    from explorer.lab.checkpoint import save_shipped

    torch.set_num_threads(threads)
    fp32_everywhere()
    chosen = sweep.read_choice()
    trained, start = 0, time.time()
    while (limit is None or trained < limit) and not STOP.is_set():
        item = _next(phase)
        if item is None:
            # what is left is claimed by other workers, but may add runs (a sweep stage's walk)
            # or free one (a seed 0's row lets its later seeds start)
            if (sweep_left() if phase == SWEEP else
                    phase == "grid" and replicates_waiting(unfinished("grid")[1])):
                STOP.wait(WAIT_S)
                continue
            return 0
        stage, path, run, sweep_hyper = item
        stage_budget = budget or sweep.phase_budget(stage)
        key = work_key(run, sweep_hyper)
        try:
            if key in _finished(stage, path):
                continue  # finished by another worker between the two reads
            hyper = sweep_hyper
            if hyper is None:
                if run.arch not in chosen:
                    raise SystemExit(f"No swept hyperparameters for {run.arch}: run the sweep.")
                hyper = chosen[run.arch]
            if stage == "grid":  # continue after the attempts that did not converge
                run = replace(run, attempt=next_attempts().get(key, 0))
            while True:
                result = _train_one(run, hyper, stage_budget, checkpoint_path(run, sweep_hyper))
                if result is None:  # stopped (`STOP`): its checkpoint is saved
                    print(f"  {key}: stopped, checkpoint saved", flush=True)
                    return 0
                if (stage != "grid" or not run.in_arch_grid
                        or run.attempt + 1 >= stage_budget.max_attempts
                        or convergence(result.row()).converged):
                    break
                append_row(result, ATTEMPTS_CSV)  # kept: the tab and --summary show them
                print(f"  {key}: not converged at {result.steps:,} steps, training again "
                      f"with twice the steps", flush=True)
                run = replace(run, attempt=run.attempt + 1)
            append_row(result, path)
            if stage == "grid" and _keep_model(run):
                save_shipped(result.model, replace(run, attempt=0))
            trained += 1
            print(f"{time.time() - start:7.0f}s {key}: test {result.test_acc:.4f} val "
                  f"{result.val_acc:.4f} train {result.train_acc:.4f} ({result.seconds:.0f}s)",
                  flush=True)
        finally:
            _release(key)
    return 0


def supersede(choice: dict[str, Hyper]) -> int:
    """Move the grid's rows and attempts that ``choice`` would train otherwise (a sweep re-run
    changed its mind: another learning rate, weight decay or augmentation, or a floor that
    changes the run's steps) to `SUPERSEDED_CSV`, and delete their runs' checkpoints and
    shipped models, so those runs train again with the choice. A row whose floor changed
    without changing its steps is the same run: it stays, relabelled with the new floor.
    Returns the rows moved."""
    import torch

    from explorer.lab.checkpoint import shipped_path

    budget = Budget()

    def stale(run: LabRun, hyper: Hyper, steps: int) -> bool:
        new = choice.get(run.arch)
        return new is not None and (hyper.recipe() != new.recipe()
                                    or steps != run_steps(run, budget, new))

    moved = 0
    for path in (GRID_CSV, ATTEMPTS_CSV):
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns, raw = reader.fieldnames, list(reader)
        typed = read_grid(path)
        old, relabelled = [], 0
        for r, t in zip(raw, typed, strict=True):
            if stale(LabRun.of(t), Hyper.of(t), t["steps"]):
                old.append(r)
                # the model the tab's views load, trained with the old choice
                shipped_path(replace(LabRun.of(t), attempt=0)).unlink(missing_ok=True)
            elif t["arch"] in choice and "floor" in r and t["floor"] != choice[t["arch"]].floor:
                r["floor"] = str(choice[t["arch"]].floor)
                relabelled += 1
        if old:
            new = not SUPERSEDED_CSV.is_file()
            with open(SUPERSEDED_CSV, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerows(old)
        if old or relabelled:
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(r for r in raw if r not in old)
        moved += len(old)
    for ckpt in CHECKPOINTS_DIR.glob("*.pt"):  # the grid's (a sweep run's has its own hyper)
        extra = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)["extra"]
        run, hyper = LabRun(**extra["run"]), Hyper(**extra["hyper"])
        if ckpt.stem == run.name and stale(run, hyper, extra.get(
                "steps", run_steps(run, budget, hyper))):
            ckpt.unlink()
    return moved


def settle_choice() -> int:
    """Before the grid trains: the sweep's choice (`sweep.choose`), written to
    `paths.HYPER_JSON` when it changed, and the grid's rows, attempts and checkpoints trained
    with another moved away (`supersede`). Returns the rows moved.

    Raises:
        SystemExit: the sweep has not finished for every architecture.
    """
    choice = sweep.choose(read_grid(SWEEP_CSV))
    if set(choice) != set(LAB_ARCHS):
        raise SystemExit("The sweep has not finished for every architecture: run it "
                         f"(python -m explorer.lab.grid --only {SWEEP}).")
    if choice != sweep.read_choice():
        sweep.write_choice(choice)
        print(f"hyperparameters: {json.dumps({a: asdict(h) for a, h in choice.items()})}",
              flush=True)
    if moved := supersede(choice):
        print(f"{moved} rows trained with other hyperparameters moved to "
              f"{SUPERSEDED_CSV.name}; their runs train again", flush=True)
    return moved


def drive(workers: int, phases: tuple[str, ...] = (SWEEP, "grid"),
          limit: int | None = None, threads: int | None = None) -> int:
    """Run the phases in order (`SWEEP`: every sweep stage), each with ``workers``
    processes of ``threads`` torch threads (default: the cores shared out,
    `tuning.threads_per_request`: one each for two workers on two cores, both for one worker
    left; measured in BENCHMARKS.md, session 29); write the sweep's choice after its stages."""
    for claim in CHECKPOINTS_DIR.glob("*.claim"):  # left by workers that were killed
        claim.unlink()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as on Ctrl-C
    for phase in phases:
        if phase == "grid":
            settle_choice()
        cmd = [sys.executable, "-m", "explorer.lab.grid", "--phase", phase,
               "--threads", str(threads or threads_per_request(workers))]
        cmd += ["--limit", str(limit)] if limit else []
        procs = [subprocess.Popen(cmd) for _ in range(workers)]
        try:
            codes = [p.wait() for p in procs]
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the workers save their runs, then stop
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait()
            return 130
        if max(codes):
            return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--phase", choices=(SWEEP,) + PHASES,
                        help="be one worker of this phase (sweep: of every sweep stage)")
    parser.add_argument("--only", choices=(SWEEP,) + PHASES, nargs="+",
                        help="drive only these phases")
    parser.add_argument("--limit", type=int, default=None, help="train at most this many runs")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default: the cores shared out)")
    parser.add_argument("--status", action="store_true", help="print the grid's progress")
    parser.add_argument("--summary", action="store_true",
                        help="print the grid's tables (Markdown) and exit")
    args = parser.parse_args(argv)
    if args.summary:
        from explorer.lab.summary import summary_markdown
        print(summary_markdown(read_grid(GRID_CSV), read_grid(SWEEP_CSV),
                               read_grid(ATTEMPTS_CSV)))
        return 0
    if args.status:
        for phase, items in sweep_left().items():  # they train before the grid
            print(f"{phase}: {len(items)} runs to train first: "
                  f"{', '.join(work_key(run, hyper) for run, hyper in items)}")
        s = status()
        print(f"{len(s['done'])} done, {len(s['training'])} begun ({len(s['running'])} in a "
              f"worker now), {len(s['todo'])} to do")
        for key, step, steps in s["training"]:
            print(f"  training {key}: step {step}/{steps}" if key in s["running"] else
                  f"  waiting  {key}: step {step}/{steps} (checkpoint kept; a worker resumes "
                  "it when the runs before it are done)")
        left = remaining_seconds(s, read_grid(GRID_CSV) + read_grid(ATTEMPTS_CSV),
                                 read_grid(SWEEP_CSV), sweep_left=sweep_left())
        if left is not None and (s["training"] or s["todo"]):
            print(f"about {left / 3600:.1f} core-hours left at the finished runs' speeds, "
                  "the sweep's included (workers × hours = core-hours; more where a run does "
                  "not converge and trains again with twice the steps)")
            factor = machine_factor(s, read_grid(GRID_CSV) + read_grid(ATTEMPTS_CSV))
            if factor is not None:
                print(f"this machine trains the runs in flight at {1 / factor:.2f}× those "
                      f"speeds: about {left * factor / 3600:.1f} core-hours here")
        return 0
    if args.phase:
        for sig in (signal.SIGTERM, signal.SIGINT):  # save the run, then stop (`STOP`)
            signal.signal(sig, lambda *_: STOP.set())
        keep_freed_memory()  # a worker process only trains: 1.16–1.31× the images/s
        pause_on_sigtstp()  # `kill -TSTP` pauses a worker without counting the pause
        return work(args.phase, args.limit, threads=args.threads or 1)
    return drive(args.workers, tuple(args.only or (SWEEP, "grid")), args.limit, args.threads)


if __name__ == "__main__":
    sys.exit(main())
