"""Train one lab model from scratch on n Fashion-MNIST images and test it: `run_lab`.

Pure functions, no gradio. A run is fixed by a `LabRun` (architecture, width, depth, data
variant, training images, seed, budget scale), the `Budget` rule and the architecture's
`Hyper` (learning rate, weight decay, augmentation: chosen per architecture by the sweep in
`explorer.lab.sweep`); the same run on the same machine and thread count gives the same
numbers, and a run resumed from its checkpoint gives the same weights as one that never
stopped (every batch is a pure function of the seed and the step; tested).

The budget rule (`Budget`), one sentence: every run trains on 90% of its images (the other
10%, at most 2,000, are its validation split) for 30 epochs but at least 3,000 AdamW steps of
128 images (a floor the sweep doubles for an architecture still gaining from twice as many:
`Hyper.floor`), with 5% linear warm-up and cosine decay to zero, and a run that has not converged
(`analysis.convergence`: validation accuracy still gaining 0.3 points in its last 20% of
steps, read from a line fitted through that fifth's evaluations, or train below test
accuracy) is trained again from scratch with twice the steps, up to four times the base
(`LabRun.attempt`); a second seed starts at the steps its first seed's kept attempt trained
(`grid.next_attempts`); nothing is chosen on the test set.

The training loop is the one every trainer shares (`explorer.training`); this module keeps
the lab's own data path: in-memory 28-px tensors, seeded stratified subsets, random 2-px
shifts and flips in the original image and then, for the scrambled variant, the fixed
scramble (`explorer.lab.scramble`).
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from explorer.datasets import read_fashion_mnist, stratified_sample
from explorer.lab.models import (
    DEFAULT_SIZES,
    IMAGE_SIZE,
    MEAN,
    PATCH,
    STD,
    ArchSpec,
    build,
    param_count,
)
from explorer.lab.scramble import Scramble, make_scramble, scramble_images
from explorer.training import Checkpointing, Recipe, TrainLoop, warmup_steps

VARIANTS = ("original", "scrambled")
TRAIN_ACC_IMAGES = 2000  # training images (not augmented) scored at each evaluation


@dataclass(frozen=True)
class Hyper:
    """What the sweep chooses per architecture: peak learning rate, AdamW weight decay,
    augmentation (random shifts of up to ``shift`` px, horizontal flips when ``flip``) and
    ``floor``, the multiple of the budget rule's step floor (`Budget.min_steps`) its runs
    train at least."""

    lr: float = 1e-3
    weight_decay: float = 0.05
    shift: int = 2
    flip: bool = True
    floor: float = 1.0

    @classmethod
    def of(cls, row: dict) -> Hyper:
        """The hyperparameters a grid or sweep row was trained with."""
        return cls(row["lr"], row["weight_decay"], row["shift"], row["flip"],
                   row.get("floor", 1.0))

    def recipe(self) -> Hyper:
        """These hyperparameters but the floor: what two runs that train the same number of
        steps must share to be the same run."""
        return replace(self, floor=1.0)

    def augmentation(self) -> str:
        """The augmentation in words: "2-px shifts, flips", "none"."""
        parts = ([f"{self.shift}-px shifts"] if self.shift else []) + (["flips"] if self.flip
                                                                       else [])
        return ", ".join(parts) or "none"


# How the sweep's last three stages (`explorer.lab.sweep.floor_stage`, `wd_stage`,
# `lr_full_stage`) change a choice, part of the rule the tab states: a doubled floor, another
# weight decay or learning rate is kept only when it validates this much better than what it
# would replace (on the stages' 2,000 validation images, one standard error ±0.8–0.9 points);
# the floor doubles up to MAX_FLOOR.
STAGE_GAIN = 0.01
MAX_FLOOR = 4.0  # at most 12,000 steps


@dataclass(frozen=True)
class Budget:
    """The budget rule: ``max(min_steps, epochs × fit images / batch)`` optimiser steps of
    ``batch`` images (× the run's ``budget`` scale), 5% warm-up, cosine decay to zero; the
    validation split is ``val_frac`` of the run's images (at most ``max_val``), evaluated
    ``evals`` times (the last at the end)."""

    epochs: float = 30
    min_steps: int = 3000
    batch: int = 128
    warmup_frac: float = 0.05
    val_frac: float = 0.1
    max_val: int = 2000
    evals: int = 40  # every 2.5% of the steps: nine evaluations in the last fifth's fit
    test_images: int | None = None  # the final test set: None = all 10,000 (tests use fewer)
    checkpoint_every_s: float = 120.0  # training seconds between checkpoints (with a path)
    max_attempts: int = 3  # a run that has not converged retrains at 2×, then 4× the steps

    def val_images(self, n: int) -> int:
        return min(self.max_val, max(10, round(n * self.val_frac)))

    def steps(self, n: int, scale: float = 1.0, floor: float = 1.0) -> int:
        """Optimiser steps for a run on ``n`` images (its fit split: n − validation), at
        ``floor`` times the step floor (`Hyper.floor`)."""
        fit = n - self.val_images(n)
        return max(1, round(scale * max(round(floor * self.min_steps),
                                        math.ceil(self.epochs * fit / self.batch))))

    def sentence(self) -> str:
        """The rule in one sentence, for the tab."""
        gain, max_floor = STAGE_GAIN, MAX_FLOOR
        return (f"every run trains on {100 * (1 - self.val_frac):.0f}% of its images (the other "
                f"{100 * self.val_frac:.0f}%, at most {self.max_val:,}, validate) for "
                f"{self.epochs:g} epochs but at least {self.min_steps:,} AdamW steps of "
                f"{self.batch} images (a floor the sweep doubles, up to {max_floor:g}×, for an "
                f"architecture whose validation accuracy gains {100 * gain:g} point"
                f"{'s' * (gain != 0.01)} from twice as many), "
                f"with warm-up and cosine decay; a run whose validation "
                f"accuracy still gains in its last 20% of steps is trained again with twice "
                f"the steps (up to {2 ** (self.max_attempts - 1)}×), and a second seed trains "
                f"the steps its first seed kept; learning rate, weight "
                f"decay and augmentation per architecture come from the same sweep, "
                f"never from the test set")


# The tab's live run: the same recipe cut to 600 steps (a fifth of the grid's floor), so it
# finishes in a few minutes on a laptop CPU; the tab labels it as the shorter budget it is.
LIVE_BUDGET = Budget(epochs=0, min_steps=600, evals=6)


@dataclass(frozen=True)
class LabRun:
    arch: str
    train_images: int
    seed: int = 0
    width: int = 0  # 0: the architecture's default (`models.DEFAULT_SIZES`)
    depth: int = 0
    variant: str = "original"  # or "scrambled": `explorer.lab.scramble`
    budget: float = 1.0  # scale of the budget rule's steps (the size sweep's shorter budgets)
    attempt: int = 0  # retrained after not converging: 2**attempt × the budget's steps

    def __post_init__(self):
        spec = ArchSpec(self.arch, self.width, self.depth)
        object.__setattr__(self, "width", spec.width)
        object.__setattr__(self, "depth", spec.depth)
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, not {self.variant!r}")

    @classmethod
    def of(cls, row: dict) -> LabRun:
        """The run a grid row (`grid.COLUMNS`) records."""
        return cls(row["arch"], row["train_images"], row["seed"], row["width"], row["depth"],
                   row["variant"], row["budget"], row.get("attempt", 0))

    @property
    def spec(self) -> ArchSpec:
        return ArchSpec(self.arch, self.width, self.depth)

    @property
    def in_arch_grid(self) -> bool:
        """A run of the architecture grid (original or scrambled): the architecture's grid
        size at the full budget. The size sweep's other widths and its fixed shorter budgets
        are frontier points, short on purpose: the convergence rule does not apply to them
        and they never retrain."""
        return self.budget == 1.0 and (self.width, self.depth) == DEFAULT_SIZES[self.arch]

    @property
    def name(self) -> str:
        name = f"{self.spec.name}-n{self.train_images}-s{self.seed}"
        if self.variant != "original":
            name += f"-{self.variant}"
        if self.budget != 1.0:
            name += f"-b{self.budget:g}"
        if self.attempt:
            name += f"-a{self.attempt}"
        return name

    @property
    def scale(self) -> float:
        """The share of the budget rule's steps this run trains for."""
        return self.budget * 2 ** self.attempt


def run_steps(run: LabRun, budget: Budget, hyper: Hyper) -> int:
    """The optimiser steps ``run`` trains for under ``budget`` with ``hyper``'s floor."""
    return budget.steps(run.train_images, run.scale, hyper.floor)


@dataclass
class LabResult:
    """One row of the grid (`grid.COLUMNS`) plus the trained model."""

    arch: str
    width: int
    depth: int
    params: int
    flops: int  # forward FLOPs per image (torch's FlopCounterMode: 2 per multiply-add)
    variant: str
    train_images: int  # the run's images: fit + validation
    fit_images: int
    val_images: int
    budget: float
    attempt: int
    steps: int
    batch: int
    epochs: float  # passes over the fit images
    lr: float
    weight_decay: float
    shift: int
    flip: bool
    floor: float  # `Hyper.floor`
    seconds: float
    device: str  # what trained it: "cpu", "cuda", or "cpu+cuda" for a run resumed across both
    seed: int
    train_acc: float  # on up to `TRAIN_ACC_IMAGES` fit images, not augmented
    val_acc: float
    test_acc: float
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (step, val, train)
    model: nn.Module | None = None

    def row(self) -> dict:
        row = asdict(replace(self, model=None))  # asdict would deep-copy the model
        del row["model"]
        return row


@dataclass
class LabEvent:
    step: int
    total_steps: int
    loss: float
    val_acc: float | None = None  # at evaluation steps
    train_acc: float | None = None
    result: LabResult | None = None


@lru_cache(maxsize=2)
def _split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = read_fashion_mnist(split)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels)


@lru_cache(maxsize=1)
def scramble() -> Scramble:
    """The experiment's one fixed scramble (seed 0)."""
    return make_scramble(IMAGE_SIZE, PATCH, seed=0)


# The memory layout the lab trains in: channels-last lets oneDNN's convolutions skip their
# reorders (per eager step on this CPU: the CNN 1.31×, CoAtNet 1.24× faster; the ViTs, whose
# one convolution is the patch embedding, within noise: BENCHMARKS.md). Saved models go
# back to the ordinary layout (safetensors stores contiguous tensors only).
LAYOUT = torch.channels_last


def normalise(images: torch.Tensor) -> torch.Tensor:
    """(B, 28, 28) uint8 → (B, 3, 28, 28) float, the lab models' input."""
    x = images.float().div_(255.0).unsqueeze(1)
    mean = torch.tensor(MEAN[0], device=x.device)
    std = torch.tensor(STD[0], device=x.device)
    return ((x - mean) / std).expand(-1, 3, -1, -1)


def model_input(images: torch.Tensor, variant: str = "original") -> torch.Tensor:
    """(B, 28, 28) uint8 images (already augmented) → the model's input for ``variant``."""
    if variant == "scrambled":
        images = scramble_images(images, scramble())
    return normalise(images)


def augment(images: torch.Tensor, generator: torch.Generator, shift: int = 2,
            flip: bool = True) -> torch.Tensor:
    """Random shifts of up to ``shift`` px (zero padding) and horizontal flips, per image."""
    B = images.shape[0]
    out = images
    if shift:
        padded = F.pad(images, (shift, shift, shift, shift))
        dy = torch.randint(0, 2 * shift + 1, (B,), generator=generator)
        dx = torch.randint(0, 2 * shift + 1, (B,), generator=generator)
        rows = (dy[:, None] + torch.arange(IMAGE_SIZE))[:, :, None]
        cols = (dx[:, None] + torch.arange(IMAGE_SIZE))[:, None, :]
        out = padded[torch.arange(B)[:, None, None], rows, cols]
    if flip:
        out = out.clone() if out is images else out
        flips = torch.rand(B, generator=generator) < 0.5
        out[flips] = out[flips].flip(-1)
    return out


def batch_indices(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """The images of optimiser step ``step`` (0-based): a fresh seeded permutation each
    epoch, so a resumed run draws the same batches as one that never stopped."""
    if n <= batch:
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + step))
    per_epoch = n // batch
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[i * batch:(i + 1) * batch]


def train_batch(step: int, fit_x: torch.Tensor, fit_y: torch.Tensor, run: LabRun,
                budget: Budget, hyper: Hyper) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimiser step ``step``'s inputs and labels: its images (`batch_indices`), augmented
    in the original image, then scrambled for the scrambled variant, then normalised."""
    idx = batch_indices(step, len(fit_y), budget.batch, run.seed)
    g = torch.Generator().manual_seed((run.seed << 32) + step + 1)
    return model_input(augment(fit_x[idx], g, hyper.shift, hyper.flip), run.variant), fit_y[idx]


def forward_flops(model: nn.Module) -> int:
    """Forward FLOPs for one image (FlopCounterMode counts 2 per multiply-add)."""
    device = next(model.parameters()).device
    x = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             variant: str = "original", batch: int = 500) -> float:
    """Top-1 accuracy on (N, 28, 28) uint8 ``images`` of ``variant``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        logits = model(model_input(images[i:i + batch], variant).to(device,
                                                                   memory_format=LAYOUT))
        correct += int((logits.argmax(-1).cpu() == labels[i:i + batch]).sum())
    model.train(was_training)
    return correct / max(1, len(images))


def test_subset(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed stratified subset of ``n`` test images and labels (None: all 10,000)."""
    images, labels = _split("test")
    if n is None:
        return images, labels
    keep = torch.from_numpy(stratified_sample(labels.cpu().numpy(), n, seed=0))
    return images[keep], labels[keep]


def run_data(run: LabRun, budget: Budget) -> tuple[torch.Tensor, ...]:
    """The run's fit images/labels and validation images/labels: a seeded stratified subset
    of the training split, then a seeded stratified validation split carved out of it.

    Raises:
        ValueError: more training images than Fashion-MNIST has, or too few to split.
    """
    train_x, train_y = _split("train")
    if not 20 <= run.train_images <= len(train_y):
        raise ValueError(f"train_images must be between 20 and {len(train_y)}.")
    keep = stratified_sample(train_y.cpu().numpy(), run.train_images, run.seed)
    xs, ys = train_x[torch.from_numpy(keep)], train_y[torch.from_numpy(keep)]
    val = torch.zeros(len(ys), dtype=torch.bool)
    val[torch.from_numpy(stratified_sample(ys.cpu().numpy(), budget.val_images(len(ys)),
                                           seed=run.seed + 10_000))] = True
    return xs[~val], ys[~val], xs[val], ys[val]


def machine_id() -> str:
    """This machine, as booted now: Linux's boot id (host names repeat across containers and
    virtual machines: every session's machine here is called "vm"), else the host name."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


def trained_on(starts: list[dict]) -> str:
    """The devices a run's starts trained on, joined: "cpu", "cuda", or "cpu+cuda" (its
    seconds then add both). A start saved before starts named their device was a CPU's:
    no grid run had trained on a GPU until then."""
    return "+".join(sorted({s.get("device", "cpu") for s in starts}))


def on_cpu_alone(row: dict) -> bool:
    """Whether a grid row trained on a CPU alone: its seconds are a CPU worker's (a row read
    from a file written before rows named their device was: `grid.read_grid`)."""
    return row.get("device", "cpu") == "cpu"


def run_lab(run: LabRun, budget: Budget = Budget(), hyper: Hyper = Hyper(),
            cancel: threading.Event | None = None, checkpoint: Path | None = None,
            log_every: int = 10, compile: bool = False,
            mixed_precision: str = "auto") -> Iterator[LabEvent]:
    """Train ``run`` under ``budget`` with ``hyper``; yields progress, the last event carries
    the result. With ``checkpoint`` the run saves itself there every
    ``budget.checkpoint_every_s`` training seconds (and when cancelled) and continues from
    it when it exists; the file is removed when the run finishes. ``compile`` trains through
    ``torch.compile`` (the grid's workers for the ViTs, `grid.COMPILED_ARCHS`).
    ``mixed_precision`` is `training.make_accelerator`'s: "auto" (the app's rule, the one
    every trainer in the app's process follows: fp32 on a CPU, bf16 on a GPU) or "no" (the
    grid's workers, `grid.GRID_PRECISION`).

    Raises:
        ValueError: more training images than Fashion-MNIST has, or too few.
    """
    fit_x, fit_y, val_x, val_y = run_data(run, budget)
    total = run_steps(run, budget, hyper)
    model = build(run.spec, seed=run.seed).to(memory_format=LAYOUT)
    params, flops = param_count(model), forward_flops(model)
    recipe = Recipe(lr=hyper.lr, total_steps=total, weight_decay=hyper.weight_decay,
                    warmup_steps=warmup_steps(total, budget.warmup_frac))
    curve: list[tuple[int, float, float]] = []
    # each start of the run: the machine, and the step and training seconds it started from
    # (`grid.status` times the machine a grid is training on by its latest)
    starts: list[dict] = []
    loop = TrainLoop(model, recipe, mixed_precision=mixed_precision, cancel=cancel,
                     compile=compile,
                     checkpoint=Checkpointing(checkpoint, every_s=budget.checkpoint_every_s)
                     if checkpoint else None,
                     extra_state=lambda: {"curve": curve, "starts": starts, "run": asdict(run),
                                          "hyper": asdict(hyper), "steps": total})
    if checkpoint is not None and loop.resume():
        saved = loop.resumed_extra
        # a field added since the checkpoint was written counts as its default
        same = {k: saved["run"].get(k, v) for k, v in asdict(run).items()} == asdict(run)
        # a floor that changed without changing this run's steps leaves it the same run
        recipe = Hyper(**{**asdict(hyper), **saved.get("hyper", {})}).recipe()
        if not same or recipe != hyper.recipe() or saved.get("steps", total) != total:
            raise ValueError(f"The checkpoint {checkpoint.name} belongs to another run.")
        curve[:] = [tuple(p) for p in saved["curve"]]
        starts[:] = saved.get("starts", [])
    device = loop.device
    starts.append({"machine": machine_id(), "device": device.type, "step": loop.step,
                   "seconds": loop.seconds})
    eval_at = {round(total * (i + 1) / budget.evals) for i in range(budget.evals)}
    train_probe = (fit_x[:TRAIN_ACC_IMAGES], fit_y[:TRAIN_ACC_IMAGES])

    def batches():
        step = loop.step
        while True:
            x, y = train_batch(step, fit_x, fit_y, run, budget, hyper)
            yield x.to(device, memory_format=LAYOUT), y.to(device)
            step += 1

    def loss_fn(m, batch):
        x, y = batch
        return F.cross_entropy(m(x), y)

    event = None
    for event in loop.fit(batches(), loss_fn):
        val_acc = train_acc = None
        if event.step in eval_at:
            val_acc = accuracy(loop.model, val_x, val_y, run.variant)
            train_acc = accuracy(loop.model, *train_probe, run.variant)
            curve.append((event.step, val_acc, train_acc))
        if event.step % log_every == 0 or val_acc is not None:
            yield LabEvent(event.step, total, event.loss, val_acc, train_acc)
    if loop.cancelled:
        return
    model = loop.unwrapped.eval()
    test_acc = accuracy(model, *test_subset(budget.test_images), run.variant)
    model = model.to(memory_format=torch.contiguous_format)
    result = LabResult(
        arch=run.arch, width=run.width, depth=run.depth, params=params, flops=flops,
        variant=run.variant, train_images=run.train_images, fit_images=len(fit_y),
        val_images=len(val_y), budget=run.budget, attempt=run.attempt, steps=total,
        batch=budget.batch,
        epochs=round(total * budget.batch / len(fit_y), 2), lr=hyper.lr,
        weight_decay=hyper.weight_decay, shift=hyper.shift, flip=hyper.flip, floor=hyper.floor,
        seconds=round(loop.seconds, 1), device=trained_on(starts), seed=run.seed,
        train_acc=curve[-1][2], val_acc=curve[-1][1], test_acc=test_acc, curve=curve, model=model.cpu())
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    yield LabEvent(total, total, event.loss if event else float("nan"), curve[-1][1],
                   curve[-1][2], result)


def train(run: LabRun, budget: Budget = Budget(), hyper: Hyper = Hyper(),
          checkpoint: Path | None = None, on_event=None, compile: bool = False,
          cancel: threading.Event | None = None,
          mixed_precision: str = "auto") -> LabResult | None:
    """`run_lab` to the end; its result, or None when ``cancel`` stopped it (saved to
    ``checkpoint`` when given)."""
    result = None
    start = time.perf_counter()
    for event in run_lab(run, budget, hyper, cancel=cancel, checkpoint=checkpoint,
                         compile=compile, mixed_precision=mixed_precision):
        if on_event is not None:
            on_event(event, time.perf_counter() - start)
        result = event.result or result
    assert result is not None or (cancel is not None and cancel.is_set())
    return result
