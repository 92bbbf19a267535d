"""The per-architecture hyperparameter sweep on the validation split (never the test set).

Two stages at one data size (`SWEEP_IMAGES` images, seed 0): the peak learning rate from
`LRS` with augmentation on, at a quarter of the budget rule's steps (extended upwards while
the best rate is the largest tried); then augmentation on and off at that rate, at the budget
rule's full steps. The learning rate is the first stage's best final validation accuracy, the
augmentation the second's; the choice is written to `paths.HYPER_JSON` and every grid run of
that architecture uses it. Weight decay is AdamW's 0.05 (DeiT's) for every architecture: not
swept, to keep the sweep small.

Why the second stage runs the full budget: augmentation pays off late. At a quarter budget the
ViT validated better without it (75.0% vs 71.3% on 300 images, within the noise of 300
images), and the grid's ViT then over-fitted at 60,000 images when the convergence rule
doubled its steps (train 99.95%, validation 1.5 points below its half-length run:
BENCHMARKS.md). The quarter-budget augmentation rows stay in `sweep.csv` and choose nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from explorer.lab.engine import Hyper, LabRun
from explorer.lab.models import LAB_ARCHS
from explorer.lab.paths import HYPER_JSON

SWEEP_IMAGES = 3000
SWEEP_BUDGET = 0.25  # of the budget rule's steps (750 steps: 36 epochs of the 2,700 fit images)
AUG_BUDGET = 1.0  # the augmentation stage: the grid's own steps at this size (3,000)
LRS = (1e-3, 2e-3, 4e-3, 8e-3)  # 8e-3 added when 4e-3 came out best for every architecture
MAX_LR = 3.2e-2
NO_AUG = {"shift": 0, "flip": False}


def sweep_run(arch: str, budget: float = SWEEP_BUDGET) -> LabRun:
    return LabRun(arch, SWEEP_IMAGES, 0, budget=budget)


def lr_stage(rows: list[dict] | None = None) -> list[tuple[LabRun, Hyper]]:
    """Every architecture at every rate of `LRS`; then, for an architecture whose best rate so
    far is the largest it tried, twice that rate (up to `MAX_LR`), so the choice is never
    left at the edge of the range for want of trying the next rate."""
    items = [(sweep_run(a), Hyper(lr=lr)) for a in LAB_ARCHS for lr in LRS]
    for a in LAB_ARCHS:
        tried = {r["lr"] for r in _rows_of(rows or [], a) if r["shift"] or r["flip"]}
        top = best(rows or [], a, augmented=True)
        if set(LRS) <= tried and top["lr"] == max(tried) and 2 * max(tried) <= MAX_LR:
            items.append((sweep_run(a), Hyper(lr=2 * max(tried))))
    return items


def _rows_of(rows: list[dict], arch: str, budget: float = SWEEP_BUDGET) -> list[dict]:
    run = sweep_run(arch, budget)
    return [r for r in rows if r["arch"] == arch and r["width"] == run.width
            and r["depth"] == run.depth and r["train_images"] == SWEEP_IMAGES
            and r["budget"] == budget]


def best(rows: list[dict], arch: str, augmented: bool | None = None,
         budget: float = SWEEP_BUDGET) -> dict | None:
    """The sweep row of ``arch`` at ``budget`` with the highest validation accuracy (ties:
    the first)."""
    cands = [r for r in _rows_of(rows, arch, budget)
             if augmented is None or bool(r["shift"] or r["flip"]) == augmented]
    return max(cands, key=lambda r: r["val_acc"], default=None)


def aug_stage(rows: list[dict]) -> list[tuple[LabRun, Hyper]]:
    """Augmentation on and off at each architecture's best learning rate, at the full budget
    (once stage 1 has a best rate for it)."""
    out = []
    for a in LAB_ARCHS:
        top = best(rows, a, augmented=True)
        if top is not None:
            out += [(sweep_run(a, AUG_BUDGET), Hyper(lr=top["lr"])),
                    (sweep_run(a, AUG_BUDGET), replace(Hyper(lr=top["lr"]), **NO_AUG))]
    return out


def choose(rows: list[dict]) -> dict[str, Hyper]:
    """Each architecture's chosen hyperparameters: its best row of the augmentation stage
    (whose learning rate is stage 1's best), once that stage has run for it."""
    out = {}
    for a in LAB_ARCHS:
        top = best(rows, a, budget=AUG_BUDGET)
        if top is not None:
            out[a] = Hyper(lr=top["lr"], weight_decay=top["weight_decay"], shift=top["shift"],
                           flip=top["flip"])
    return out


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
