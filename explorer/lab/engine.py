"""Train one lab model from scratch on n Fashion-MNIST images and test it: `run_lab`.

Pure functions, no gradio. A run is fixed by a `LabRun` (architecture, width, depth, training
images, seed) and the `Budget`; the same run on the same machine and thread count gives the
same numbers (seeded subset, initialisation, shuffling and augmentation; tested).

The budget rule, the same for every architecture and data size: a fixed number of
optimisation steps of a fixed batch (`Budget.steps` × `Budget.batch`), AdamW with linear
warm-up and cosine decay (the fine-tune engine's `cosine_schedule`), random 2-px shifts and
horizontal flips. Every run so spends the same number of training examples; with 500 images
that is many epochs, with 60,000 about one. Test accuracy is measured on a fixed held-out set
(all 10,000 test images at the end; a fixed stratified 2,000 during training, for the
error-vs-compute curves).

Accelerate places the model and batches (CPU here, a GPU where there is one), as in the
fine-tune engine; `run_lab` yields a `LabEvent` per logged step and the `LabResult` last.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from explorer.datasets import read_fashion_mnist, stratified_sample
from explorer.finetune.engine import cosine_schedule, resolve_mixed_precision
from explorer.lab.models import IMAGE_SIZE, MEAN, STD, ArchSpec, build, param_count

TEST_CURVE_IMAGES = 2000  # the fixed test subset evaluated during training
# Peak AdamW learning rate per architecture. The ViTs fit 500 images faster at 3e-3 than at
# 1e-3 (train accuracy after 400 steps 65% vs 58%); the CNN's 1e-3 is MEASURED.md's recipe.
DEFAULT_LR = {"cnn": 1e-3, "vit": 3e-3, "vit_rel": 3e-3, "coatnet": 2e-3}


@dataclass(frozen=True)
class Budget:
    """What every run spends: ``steps`` optimiser steps of ``batch`` images."""

    steps: int = 1000
    batch: int = 64
    lr: float | None = None  # None: `DEFAULT_LR` of the architecture
    weight_decay: float = 0.05
    warmup_frac: float = 0.1
    evals: int = 8  # test-curve points during training (the last is the full test set)
    test_images: int | None = None  # final test set: None = all 10,000 (tests use fewer)


@dataclass(frozen=True)
class LabRun:
    arch: str
    train_images: int
    seed: int = 0
    width: int = 0  # 0: the architecture's default (`models.DEFAULT_SIZES`)
    depth: int = 0

    @property
    def spec(self) -> ArchSpec:
        return ArchSpec(self.arch, self.width, self.depth)

    @property
    def name(self) -> str:
        return f"{self.spec.name}-n{self.train_images}-s{self.seed}"

    def __post_init__(self):
        spec = ArchSpec(self.arch, self.width, self.depth)
        object.__setattr__(self, "width", spec.width)
        object.__setattr__(self, "depth", spec.depth)


@dataclass
class LabResult:
    """One row of the grid (`grid.COLUMNS`) plus the trained model."""

    arch: str
    width: int
    depth: int
    params: int
    flops: int  # forward FLOPs per image (torch's FlopCounterMode: 2 per multiply-add)
    train_images: int
    steps: int
    batch: int
    seconds: float
    seed: int
    test_acc: float
    train_acc: float
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, test-subset acc)
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
    test_acc: float | None = None  # on the test subset, at evaluation steps
    result: LabResult | None = None


@lru_cache(maxsize=2)
def _split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = read_fashion_mnist(split)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """(B, 28, 28) uint8 → (B, 3, 28, 28) float, the lab models' input."""
    x = images.float().div_(255.0).unsqueeze(1)
    mean = torch.tensor(MEAN[0], device=x.device)
    std = torch.tensor(STD[0], device=x.device)
    return ((x - mean) / std).expand(-1, 3, -1, -1)


def augment(images: torch.Tensor, generator: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random shifts of up to ``shift`` px (zero padding) and horizontal flips, per image."""
    B = images.shape[0]
    padded = F.pad(images, (shift, shift, shift, shift))
    dy = torch.randint(0, 2 * shift + 1, (B,), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (B,), generator=generator)
    rows = (dy[:, None] + torch.arange(IMAGE_SIZE))[:, :, None]
    cols = (dx[:, None] + torch.arange(IMAGE_SIZE))[:, None, :]
    out = padded[torch.arange(B)[:, None, None], rows, cols]
    flip = torch.rand(B, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


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
             batch: int = 500) -> float:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        logits = model(normalise(images[i:i + batch].to(device)))
        correct += int((logits.argmax(-1).cpu() == labels[i:i + batch]).sum())
    model.train(was_training)
    return correct / max(1, len(images))


def test_subset(n: int | None = TEST_CURVE_IMAGES) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed stratified subset of ``n`` test images and labels (None: all 10,000)."""
    images, labels = _split("test")
    if n is None:
        return images, labels
    keep = torch.from_numpy(stratified_sample(labels.cpu().numpy(), n, seed=0))
    return images[keep], labels[keep]


def run_lab(run: LabRun, budget: Budget = Budget(), cancel: threading.Event | None = None,
            log_every: int = 10) -> Iterator[LabEvent]:
    """Train ``run`` under ``budget``; yields progress, the last event carries the result.

    Raises:
        ValueError: more training images than Fashion-MNIST has, or fewer than its classes.
    """
    train_x, train_y = _split("train")
    if not 10 <= run.train_images <= len(train_y):
        raise ValueError(f"train_images must be between 10 and {len(train_y)}.")
    keep = torch.from_numpy(stratified_sample(train_y.cpu().numpy(), run.train_images, run.seed))
    xs, ys = train_x[keep], train_y[keep]
    sub_x, sub_y = test_subset()

    accelerator = Accelerator(mixed_precision=resolve_mixed_precision("auto"))
    model = build(run.spec, seed=run.seed)
    params, flops = param_count(model), forward_flops(model)
    lr = budget.lr if budget.lr is not None else DEFAULT_LR[run.arch]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr,
                                  weight_decay=budget.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(budget.steps, budget.warmup_frac))
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    generator = torch.Generator().manual_seed(run.seed)
    eval_at = {round(budget.steps * (i + 1) / budget.evals) for i in range(budget.evals)}

    curve: list[tuple[int, float]] = []
    order = torch.randperm(len(ys), generator=generator)
    pos, start = 0, time.perf_counter()
    model.train()
    for step in range(1, budget.steps + 1):
        if cancel is not None and cancel.is_set():
            return
        if pos + budget.batch > len(order):  # a new epoch: reshuffle
            order, pos = torch.randperm(len(ys), generator=generator), 0
        idx = order[pos:pos + budget.batch] if len(order) >= budget.batch else order
        pos += budget.batch
        x = normalise(augment(xs[idx], generator).to(device))
        loss = F.cross_entropy(model(x), ys[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        test_acc = None
        if step in eval_at and step != budget.steps:
            test_acc = accuracy(model, sub_x, sub_y)
            curve.append((step, test_acc))
        if step % log_every == 0 or test_acc is not None or step == budget.steps:
            yield LabEvent(step, budget.steps, float(loss.detach()), test_acc)
    seconds = time.perf_counter() - start
    model = accelerator.unwrap_model(model).eval()
    test_acc = accuracy(model, *test_subset(budget.test_images))
    curve.append((budget.steps, accuracy(model, sub_x, sub_y)))
    train_acc = accuracy(model, xs[:2000], ys[:2000])
    result = LabResult(
        arch=run.arch, width=run.width, depth=run.depth, params=params, flops=flops,
        train_images=run.train_images, steps=budget.steps, batch=budget.batch,
        seconds=round(seconds, 1), seed=run.seed, test_acc=test_acc, train_acc=train_acc,
        curve=curve, model=model.cpu())
    yield LabEvent(budget.steps, budget.steps, float(loss.detach()), curve[-1][1], result)


def train(run: LabRun, budget: Budget = Budget()) -> LabResult:
    """`run_lab` to the end; its result."""
    result = None
    for event in run_lab(run, budget):
        result = event.result or result
    assert result is not None
    return result
