"""The per-architecture hyperparameter sweep on a validation split (never the test set).

Five stages, seed 0. First the peak learning rate from `LRS` with augmentation on, at a
quarter of the budget rule's steps, on `SWEEP_IMAGES` images (extended upwards while the best
rate is the largest tried). Then augmentation on and off at that rate, at the budget rule's
full steps, on `AUG_IMAGES` images of which `AUG_RULE` keeps 2,000 to validate (the other
3,000 train). Then the step floor (`Hyper.floor`): the second stage's chosen run again with
twice the floor's steps, and twice again while doubling gains `STAGE_GAIN` (up to
`MAX_FLOOR`). Then the weight decay: the chosen run at the neighbours of AdamW's 0.05
(DeiT's) in `WDS`, a factor of 5 apart, moving on in a direction while the next value there
validates `STAGE_GAIN` better. Last, the learning rate again, the same way, at the full
budget: the chosen run at half and twice the first stage's rate (`LR_LADDER`). The
augmentation is the second stage's better validation accuracy, the floor the smallest whose
doubling gains less than `STAGE_GAIN`, the weight decay and learning rate the last values
their walks (`_walk`) moved to; the choice is written to `paths.HYPER_JSON` and every grid
run of that architecture uses it (`grid.supersede` moves the rows trained with an earlier
choice).

Why the second stage runs the full budget: augmentation pays off late. At a quarter budget the
ViT validated better without it (75.0% vs 71.3% on 300 images), and the grid's ViT then
over-fitted at 60,000 images when the convergence rule doubled its steps. The quarter-budget
augmentation rows stay in `sweep.csv` and choose nothing.

Why its own 2,000 validation images: the stage first ran on the first stage's 3,000 images,
whose 10% split is 300 images, one standard error ±2.3 points at 80%. The ViT's two runs
came out 78.3% without augmentation and 78.0% with it, one image apart, and the grid trained
the ViT without augmentation: it fitted every training image up to 7,500, and at 60,000 its
run at twice the steps validated 1.5 points below the first (91.4 → 89.9%). 2,000 images
(±0.9 points) decide it; those 3,000-image rows stay in `sweep.csv` and choose nothing.

Why the floor stage: the budget rule's floor (3,000 steps) sets the length of every run on
fewer than about 14,000 images, and a run's convergence check reads its validation curve's last fifth, which a
cosine schedule flattens whether or not more steps would help. With augmentation the ViT at
the floor fitted only 85–87% of its training images at 3,000 and 7,500 images and passed the
check, while on 20,000 images (above the floor) doubling its steps lifted its validation
accuracy 86.7 → 89.7% and the check caught both attempts. The CNN gained nothing from
doubling at 20,000 and 60,000 images. So how long an architecture needs at least is chosen
like its learning rate: on the stage's 2,000 validation images, never the test set.

Why the last two stages, and why they need a clear gain to move: the first stage chose the
learning rate at a quarter of the steps, on 300 validation images (one standard error ±2.5
points), and the weight decay was DeiT's 0.05 without a look; the floor stage then showed the
ViTs want twice the steps, after which a lower rate may fit better. The last two stages look
at both on the chosen run, on 2,000 validation images. The choices so far were made with 0.05
and the first rate, so a neighbour has to beat them by one standard error (the bar, 1 point)
to replace them: a value within it is no evidence against what the other stages chose with.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from explorer.lab.engine import MAX_FLOOR, STAGE_GAIN, Budget, Hyper, LabRun
from explorer.lab.models import LAB_ARCHS
from explorer.lab.paths import HYPER_JSON

SWEEP_IMAGES = 3000
SWEEP_BUDGET = 0.25  # of the budget rule's steps (750 steps: 36 epochs of the 2,700 fit images)
AUG_IMAGES = 5000  # the augmentation stage: 3,000 images train, 2,000 validate (`AUG_RULE`)
AUG_RULE = Budget(val_frac=0.4)  # the budget rule with 40% (2,000 images) validating
AUG_BUDGET = 1.0  # the augmentation stage: the rule's full steps for 3,000 fit images (3,000)
LRS = (1e-3, 2e-3, 4e-3, 8e-3)  # 8e-3 added when 4e-3 came out best for every architecture
MAX_LR = 3.2e-2
NO_AUG = {"shift": 0, "flip": False}
WDS = (0.002, 0.01, 0.05, 0.25, 1.25)  # the weight-decay stage's values around 0.05, ×5 apart
FLOORS = (1.0, 2.0, MAX_FLOOR)  # the floor stage's walk: doublings up from the rule's floor
LR_LADDER = (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, MAX_LR)  # the last stage's, ×2 apart


def sweep_run(arch: str, budget: float = SWEEP_BUDGET) -> LabRun:
    """A run of the first stage (the learning rate)."""
    return LabRun(arch, SWEEP_IMAGES, 0, budget=budget)


def aug_run(arch: str) -> LabRun:
    """A run of the second stage (augmentation), trained under `AUG_RULE`."""
    return LabRun(arch, AUG_IMAGES, 0, budget=AUG_BUDGET)


def phase_budget(phase: str) -> Budget:
    """The budget rule a sweep phase's runs train under (the grid's own for the others)."""
    # every stage after the first trains on the augmentation stage's images
    return AUG_RULE if phase in STAGES and phase != next(iter(STAGES)) else Budget()


def lr_stage(rows: list[dict] | None = None) -> list[tuple[LabRun, Hyper]]:
    """Every architecture at every rate of `LRS`; then, for an architecture whose best rate so
    far is the largest it tried, twice that rate (up to `MAX_LR`), so the choice is never
    left at the edge of the range for want of trying the next rate."""
    items = [(sweep_run(a), Hyper(lr=lr)) for a in LAB_ARCHS for lr in LRS]
    for a in LAB_ARCHS:
        tried = {r["lr"] for r in _rows_of(rows or [], sweep_run(a)) if augmented(r)}
        top = best(rows or [], a, augmented_only=True)
        if set(LRS) <= tried and top["lr"] == max(tried) and 2 * max(tried) <= MAX_LR:
            items.append((sweep_run(a), Hyper(lr=2 * max(tried))))
    return items


def _rows_of(rows: list[dict], run: LabRun) -> list[dict]:
    """The sweep rows of ``run`` (its architecture, size, images and budget), any
    hyperparameters."""
    return [r for r in rows if r["arch"] == run.arch and r["width"] == run.width
            and r["depth"] == run.depth and r["train_images"] == run.train_images
            and r["budget"] == run.budget]


def augmented(row: dict) -> bool:
    return bool(row["shift"] or row["flip"])


def best(rows: list[dict], arch: str, augmented_only: bool | None = None) -> dict | None:
    """The first stage's row of ``arch`` with the highest validation accuracy (ties: the
    first), among its augmented runs with ``augmented_only``."""
    cands = [r for r in _rows_of(rows, sweep_run(arch))
             if augmented_only is None or augmented(r) == augmented_only]
    return max(cands, key=lambda r: r["val_acc"], default=None)


def aug_stage(rows: list[dict]) -> list[tuple[LabRun, Hyper]]:
    """Augmentation on and off at each architecture's best learning rate, at the full budget
    (once stage 1 has a best rate for it)."""
    out = []
    for a in LAB_ARCHS:
        top = best(rows, a, augmented_only=True)
        if top is not None:
            out += [(aug_run(a), Hyper(lr=top["lr"])),
                    (aug_run(a), replace(Hyper(lr=top["lr"]), **NO_AUG))]
    return out


def choose_aug(rows: list[dict]) -> dict[str, Hyper]:
    """Each architecture's learning rate and augmentation: the better-validating of its two
    augmentation-stage runs (at stage 1's best learning rate), once both have finished."""
    out = {}
    for a in LAB_ARCHS:
        top = best(rows, a, augmented_only=True)
        pair = [r for r in _rows_of(rows, aug_run(a)) if top is not None
                and r["lr"] == top["lr"] and r.get("floor", 1.0) == 1.0
                and r["weight_decay"] == Hyper().weight_decay]  # not the wd stage's
        if {augmented(r) for r in pair} == {True, False}:
            # a tie goes to augmentation, the recipe's default
            win = max(pair, key=lambda r: (r["val_acc"], augmented(r)))
            out[a] = Hyper.of(win)
    return out


def _stage_row(rows: list[dict], arch: str, hyper: Hyper) -> dict | None:
    """The run of ``arch`` on the augmentation stage's images (every stage after the first) with
    exactly ``hyper`` (floor, weight decay and learning rate included)."""
    return next((r for r in _rows_of(rows, aug_run(arch)) if Hyper.of(r) == hyper), None)


def _walk(rows: list[dict], arch: str, hyper: Hyper, field: str,
          ladder: tuple[float, ...]) -> tuple[float, bool, list[float]]:
    """A hill-climb of one hyperparameter (``field``, along ``ladder``) of ``arch``'s chosen
    run (``hyper`` at its other values): the value chosen so far, whether the choice is final,
    and the values the walk has looked at. From ``hyper``'s value to the better of its two
    neighbours while that validates `STAGE_GAIN` better, then on in the same direction while
    the next value does; final when the next has finished and gains less, or there is none."""
    i, step = ladder.index(getattr(hyper, field)), 0  # step: the direction, once one was taken
    seen = [ladder[i]]
    while True:
        nbrs = [j for j in (i - 1, i + 1) if 0 <= j < len(ladder) and step in (0, j - i)]
        seen += [ladder[j] for j in nbrs]
        here = _stage_row(rows, arch, replace(hyper, **{field: ladder[i]}))
        there = [_stage_row(rows, arch, replace(hyper, **{field: ladder[j]})) for j in nbrs]
        if here is None or None in there:
            return ladder[i], False, seen
        if not nbrs:
            return ladder[i], True, seen
        # ties: the smaller value, the first of the neighbours
        j, r = max(zip(nbrs, there, strict=True), key=lambda t: t[1]["val_acc"])
        if r["val_acc"] < here["val_acc"] + STAGE_GAIN:
            return ladder[i], True, seen
        i, step = j, j - i


def _walk_stage(chosen: dict[str, Hyper], rows: list[dict], field: str,
                ladder: tuple[float, ...]) -> list[tuple[LabRun, Hyper]]:
    """The runs a walk of ``field`` (`_walk`) has looked at so far, for each architecture
    in ``chosen`` (the earlier stages' choice)."""
    return [(aug_run(a), replace(hyper, **{field: v}))
            for a, hyper in chosen.items() for v in _walk(rows, a, hyper, field, ladder)[2]]


def _walk_choice(chosen: dict[str, Hyper], rows: list[dict], field: str,
                 ladder: tuple[float, ...]) -> dict[str, Hyper]:
    """``chosen`` with ``field`` set by its walk, for the architectures whose walk is final."""
    out = {}
    for a, hyper in chosen.items():
        value, final, _ = _walk(rows, a, hyper, field, ladder)
        if final:
            out[a] = replace(hyper, **{field: value})
    return out


def floor_stage(rows: list[dict]) -> list[tuple[LabRun, Hyper]]:
    """For each architecture whose augmentation is chosen, its augmentation-stage run with
    the floor doubled, and doubled again while that gains `STAGE_GAIN` (a walk up `FLOORS`)."""
    return _walk_stage(choose_aug(rows), rows, "floor", FLOORS)


def choose_floor(rows: list[dict]) -> dict[str, Hyper]:
    """Each architecture's learning rate, augmentation and floor (`choose_aug`, with the floor
    stage's floor), once the floor stage has finished for it."""
    return _walk_choice(choose_aug(rows), rows, "floor", FLOORS)


def wd_stage(rows: list[dict]) -> list[tuple[LabRun, Hyper]]:
    """For each architecture whose floor is chosen, its chosen run at the weight decays the
    walk has looked at so far: 0.05's two neighbours in `WDS`, then on while one gains."""
    return _walk_stage(choose_floor(rows), rows, "weight_decay", WDS)


def choose_wd(rows: list[dict]) -> dict[str, Hyper]:
    """`choose_floor` with the weight-decay stage's decay, where that stage has finished."""
    return _walk_choice(choose_floor(rows), rows, "weight_decay", WDS)


def lr_full_stage(rows: list[dict]) -> list[tuple[LabRun, Hyper]]:
    """For each architecture whose weight decay is chosen, its chosen run at the learning
    rates the walk has looked at so far: the first stage's rate's two neighbours in
    `LR_LADDER` (half and twice), then on while one gains."""
    return _walk_stage(choose_wd(rows), rows, "lr", LR_LADDER)


def choose(rows: list[dict]) -> dict[str, Hyper]:
    """Each architecture's chosen hyperparameters (`choose_wd`, with the full-budget learning
    rate), once all five stages have finished for it."""
    return _walk_choice(choose_wd(rows), rows, "lr", LR_LADDER)


# The stages in order, by the grid's phase names: each gives its runs from the sweep's rows.
STAGES = {"sweep-lr": lr_stage, "sweep-aug": aug_stage, "sweep-floor": floor_stage,
          "sweep-wd": wd_stage, "sweep-lr-full": lr_full_stage}


def write_choice(choice: dict[str, Hyper], path: Path = HYPER_JSON) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({a: asdict(h) for a, h in choice.items()}, indent=1) + "\n")


def hyper_for(arch: str) -> Hyper:
    """The hyperparameters a new run of ``arch`` uses: the shipped choice, else the defaults
    (before the sweep has run)."""
    return read_choice().get(arch, Hyper())


def read_choice(path: Path = HYPER_JSON) -> dict[str, Hyper]:
    """The shipped choice per architecture ({} before the sweep has run)."""
    if not path.is_file():
        return {}
    return {a: Hyper(**h) for a, h in json.loads(path.read_text()).items()}
