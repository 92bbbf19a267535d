"""The fine-tune engine, shared by the tab, the CLI and the benchmark; every mode trains on the
loop core every trainer shares (`explorer.training`; the linear probe through
`probe.train_linear_probe`).

`run_finetune` is a generator: it yields a `TrainEvent` per optimiser step (and per feature
batch in linear-probe mode), and its last event carries the `FinetuneResult`. Accelerate
handles device placement, mixed precision (GPU only: on CPUs bf16/fp16 matmuls are slower
than fp32), gradient accumulation and, under ``accelerate launch``, data-parallel
training on several GPUs. A `threading.Event` stops a run between two batches.

Modes:
    ``linear``: frozen backbone; its pre-logits features are computed once (and cached, see
        `probe.FEATURE_CACHE`), then only a linear head is trained on them by the one probe
        trainer, `probe.train_linear_probe` (its recipe: `probe.ProbeRecipe`; epochs, batch
        size and learning rate come from the config). The features are standardised for the
        optimiser and the standardisation folded back into the head, so the saved model
        computes exactly the probe's logits. With ``probe_block=K`` the
        backbone is first truncated to its first K blocks (then the final norm and the class
        token, as for the last block), so the probe reads block K's features and the saved
        model is a plain timm ViT of depth K. ``probe_pool="avg"`` probes the mean patch token
        (after the final norm) instead of the class token: timm's ``global_pool="avg"`` with
        ``fc_norm=False``, which the saved model's config records.
    ``last_k``: the last ``k`` blocks, the final norm and the head are trained.
    ``full``: every parameter is trained (position embeddings included).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader

from explorer import gpu
from explorer.datasets import ImageSet
from explorer.finetune.data import PixelDataset, make_loader
from explorer.finetune.probe import (
    FEATURE_CACHE,
    PROBE_RECIPE,
    extract_features,
    feature_key,
    forward_flops,
    train_linear_probe,
)
from explorer.finetune.resolution import set_resolution, snap_resolution
from explorer.patches import has_class_token
from explorer.training import Recipe, TrainLoop, make_accelerator, warmup_steps

MODES = ("linear", "last_k", "full")
PROBE_POOLS = ("token", "avg")  # timm global_pool values a linear probe may read
# Learning rates that work for ViT-S/B with AdamW at batch ~32 (pretrained blocks need small
# steps, as in DeiT/BEiT fine-tuning); the linear probe's is the probe recipe's.
DEFAULT_LR = {"linear": PROBE_RECIPE.lr, "last_k": 1e-4, "full": 3e-5}
# AdamW weight decay: DeiT's 0.05 for network weights; the probe recipe's for a linear head.
DEFAULT_WEIGHT_DECAY = {"linear": PROBE_RECIPE.weight_decay, "last_k": 0.05, "full": 0.05}


@dataclass
class FinetuneConfig:
    """What to train and how; converted from UI values / CLI flags in one place each.

    Attributes:
        mode: "linear" (frozen backbone + cached features), "last_k" or "full".
        last_k: blocks trained in "last_k" mode (the final norm and head always train).
        resolution: training side in pixels, snapped to the patch size; None = native.
            Position embeddings are interpolated to the new grid.
        epochs: passes over the training set.
        max_steps: stop after this many optimiser steps (demos, tests); None = no cap.
        lr: peak learning rate; None = `DEFAULT_LR` for the mode.
        weight_decay: AdamW weight decay; None = `DEFAULT_WEIGHT_DECAY` for the mode.
        batch_size: images per process per forward.
        grad_accum: batches accumulated per optimiser step (effective batch = product).
        warmup_frac: share of steps with linear warm-up before the cosine decay (network
            modes; the linear probe follows `probe.ProbeRecipe`: no warm-up).
        augment: random horizontal flips while training (not in linear mode: features are
            computed once, so there is nothing to augment).
        mixed_precision: "auto" (bf16 on GPUs that support it, else fp16; fp32 on CPU),
            or accelerate's "no" / "fp16" / "bf16".
        seed: seeds Python, NumPy, torch and the shuffle; same seed, same run (on one device).
        feature_batch_size: batch for the frozen forward in linear mode (no gradients: larger).
        probe_block: linear mode only: probe the features after block K (1-based, then
            the final norm) instead of after the last block; the model is truncated to K
            blocks, so the saved checkpoint is a timm ViT with ``depth=K``. None = last block.
        probe_pool: linear mode only: the pooled feature the probe reads, "token" (class
            token) or "avg" (mean patch token, after the final norm); None = the model's own.
    """

    mode: str = "linear"
    last_k: int = 2
    resolution: int | None = None
    epochs: int = 3
    max_steps: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    batch_size: int = 32
    grad_accum: int = 1
    warmup_frac: float = 0.05
    augment: bool = True
    mixed_precision: str = "auto"
    seed: int = 0
    feature_batch_size: int = 64
    probe_block: int | None = None
    probe_pool: str | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.last_k < 1:
            raise ValueError("epochs, batch_size, grad_accum and last_k must be >= 1")
        if self.probe_block is not None:
            if self.mode != "linear":
                raise ValueError("probe_block applies to the linear probe (mode 'linear') only")
            if self.probe_block < 1:
                raise ValueError("probe_block must be >= 1 (or None for the last block)")
        if self.probe_pool is not None:
            if self.mode != "linear":
                raise ValueError("probe_pool applies to the linear probe (mode 'linear') only")
            if self.probe_pool not in PROBE_POOLS:
                raise ValueError(f"probe_pool must be one of {PROBE_POOLS}")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]

    @property
    def decay(self) -> float:
        """The AdamW weight decay this run uses."""
        return self.weight_decay if self.weight_decay is not None else DEFAULT_WEIGHT_DECAY[self.mode]


@dataclass
class FinetuneResult:
    """What a run produced.

    Attributes:
        model: the trained model (unwrapped, on CPU, eval mode), classifier for ``classes``.
        classes: class names, in label order.
        resolution: (height, width) trained at.
        history: one dict per optimiser step (step, epoch, loss, acc, lr, images: seen so
            far by this process, time: training seconds so far) and per evaluation (step,
            epoch, val_loss, val_acc).
        val_acc: final validation accuracy (NaN when cancelled before evaluating).
        val_labels, val_preds: (N,) int arrays in validation-set order.
        confusion: (C, C) counts, rows = true class, columns = predicted.
        cancelled: the run was stopped by its cancel event.
        timings: seconds per stage ("features", "train", "eval") and "train_images_per_s".
        feature_cache_hit: linear mode found its features already computed.
    """

    model: nn.Module
    classes: list[str]
    resolution: tuple[int, int]
    history: list[dict] = field(default_factory=list)
    val_acc: float = float("nan")
    val_labels: np.ndarray | None = None
    val_preds: np.ndarray | None = None
    confusion: np.ndarray | None = None
    cancelled: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    feature_cache_hit: bool = False


@dataclass
class TrainEvent:
    """One progress report.

    Attributes:
        stage: "features" (frozen forward), "train", "eval", "done" or "cancelled".
        done, total: progress within the stage (batches for features, steps for training).
        metrics: the latest history entry (train: loss/acc/lr; eval: val_loss/val_acc).
        result: set on the last event only.
    """

    stage: str
    done: int
    total: int
    metrics: dict = field(default_factory=dict)
    result: FinetuneResult | None = None

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


def prepare_model(model: nn.Module, num_classes: int, config: FinetuneConfig) -> tuple[int, int]:
    """Set resolution, depth, new head and trainable parameters in place; returns the size."""
    if config.probe_block is not None:
        truncate_blocks(model, config.probe_block)
    size = snap_resolution(model, config.resolution)
    set_resolution(model, size)
    model.reset_classifier(num_classes)
    if config.probe_pool is not None:
        set_pooling(model, config.probe_pool)
    model.float()
    if config.mode == "full":
        trainable = list(model.parameters())
    else:
        model.requires_grad_(False)
        trainable = list(model.head.parameters())
        if config.mode == "last_k":
            k = min(config.last_k, len(model.blocks))
            for module in [*model.blocks[-k:], model.norm, model.fc_norm]:
                trainable += list(module.parameters())
    for p in trainable:
        p.requires_grad_(True)
    return size


def truncate_blocks(model: nn.Module, depth: int) -> None:
    """Keep the first ``depth`` blocks of a timm ViT (in place): the model then computes the
    features after block ``depth``, followed by the final norm and pooling as before."""
    if depth > len(model.blocks):
        raise ValueError(f"probe_block {depth} > the model's {len(model.blocks)} blocks")
    model.blocks = model.blocks[:depth]
    if hasattr(model, "feature_info"):
        model.feature_info = model.feature_info[:depth]


def set_pooling(model: nn.Module, pool: str) -> None:
    """Pool the final-normed tokens with timm's ``global_pool`` ``pool`` (in place); only for
    ViTs whose norm comes before pooling (no fc_norm, no attention pool), so "avg" is the mean
    patch token after the final norm, as in DINOv2's linear evaluation."""
    if pool == model.global_pool:
        return
    if not isinstance(model.fc_norm, nn.Identity) or model.attn_pool is not None:
        raise ValueError("probe_pool needs a ViT that normalises before pooling (no fc_norm)")
    if pool == "token" and not has_class_token(model):
        raise ValueError("this model has no class token to probe")
    model.global_pool = pool


def run_finetune(
    model: nn.Module,
    train_set: ImageSet,
    val_set: ImageSet,
    config: FinetuneConfig,
    cancel: threading.Event | None = None,
    model_key: str | None = None,
) -> Iterator[TrainEvent]:
    """Train ``model`` (modified in place: pass a fresh copy, never a shared cached one).

    Args:
        model: a timm VisionTransformer, freshly built for this run.
        train_set, val_set: labelled images with the same ``classes``.
        config: mode, resolution, schedule.
        cancel: set it to stop between two batches; the last event then has
            ``result.cancelled`` and no evaluation.
        model_key: names the weights for the linear-probe feature cache (e.g. the catalogue
            name); None = derived from the weights themselves.

    Yields:
        `TrainEvent`s; the last one has ``stage`` "done" or "cancelled" and the result.
    """
    if list(train_set.classes) != list(val_set.classes):
        raise ValueError("train_set and val_set must have the same classes")
    cancel = cancel or threading.Event()
    set_seed(config.seed)
    # (accelerate's state is process-wide: one run at a time)
    accelerator = make_accelerator(config.mixed_precision, config.grad_accum)
    size = prepare_model(model, len(train_set.classes), config)
    data_config = timm.data.resolve_model_data_config(model)
    result = FinetuneResult(model, list(train_set.classes), size)

    if config.mode == "linear":
        trainer = _linear_probe(accelerator, model, train_set, val_set, data_config, config,
                                cancel, result, model_key)
    else:
        trainer = _train_network(accelerator, model, train_set, val_set, data_config, config,
                                 cancel, result)
    yield from trainer
    accelerator.wait_for_everyone()
    model.eval().cpu()
    accelerator.free_memory()
    stage = "cancelled" if result.cancelled else "done"
    last = result.history[-1] if result.history else {}
    yield TrainEvent(stage, 1, 1, last, result)


def cancelled_event(model: nn.Module, train_set: ImageSet, config: FinetuneConfig,
                    events: list[TrainEvent]) -> TrainEvent:
    """The last event of a run stopped from outside the engine: on ZeroGPU the worker's
    generator is closed at a yield and cannot send its own (`explorer.gpu.stream_on_device`).

    Its result holds what the app has: the history streamed so far and ``model`` as it was
    handed to the run (the weights trained in the worker are not sent back: a cancelled run
    saves nothing); no evaluation.
    """
    history = [e.metrics for e in events if e.stage in ("train", "eval")]
    result = FinetuneResult(model, list(train_set.classes),
                            snap_resolution(model, config.resolution), history, cancelled=True)
    return TrainEvent("cancelled", 1, 1, history[-1] if history else {}, result)


def finetune_work(model: nn.Module, n_train: int, n_val: int, config: FinetuneConfig
                  ) -> tuple[int, int, int, float]:
    """The work a run plans, as `explorer.gpu.training_seconds` counts it: its optimiser
    steps; the images through the data path and their pixels at its resolution; 2 ×
    parameters × tokens FLOPs per image and forward pass (`probe.forward_flops`), three
    passes' worth to train (forward and backward; an upper bound for ``last_k`` and a
    truncated probe).

    Returns:
        ``(steps, images, pixels per image, FLOPs)``.
    """
    size = snap_resolution(model, config.resolution)
    forward = forward_flops(model, size)
    network = config.mode != "linear"
    batch = config.batch_size * config.grad_accum if network else min(config.batch_size, n_train)
    per_epoch = math.ceil(n_train / batch)
    steps = per_epoch * config.epochs
    if config.max_steps is not None:
        steps = min(steps, config.max_steps)
    if network:  # an evaluation after each epoch begun
        epochs = math.ceil(steps / per_epoch)
        trained, evaluated = min(n_train * epochs, steps * batch), n_val * epochs
    else:  # the features once, then a linear head on them
        trained, evaluated = 0, n_train + n_val
    return steps, trained + evaluated, size[0] * size[1], (3 * trained + evaluated) * forward


def finetune_seconds(model: nn.Module, n_train: int, n_val: int, config: FinetuneConfig) -> int:
    """The ZeroGPU duration to ask for this run (`explorer.gpu.training_seconds` of its
    `finetune_work`)."""
    return gpu.training_seconds(*finetune_work(model, n_train, n_val, config))


def too_long_for_one_call(model: nn.Module, n_train: int, n_val: int, config: FinetuneConfig,
                          limit: int = gpu.MAX_CALL_S) -> str | None:
    """Why this run cannot finish within one GPU call of ``limit`` seconds (ZeroGPU's
    `explorer.gpu.MAX_CALL_S`), as a message for the person who asked, or None when it fits.

    The run's seconds are `explorer.gpu.work_seconds` of its `finetune_work`; the message
    gives them, the most epochs that fit (the other settings as they are), and what else
    shortens a run: fewer images, a lower resolution, a linear probe where one would fit.
    """
    def seconds(**change) -> int:
        return gpu.work_seconds(*finetune_work(model, n_train, n_val, replace(config, **change)))

    needed = seconds()
    if needed <= limit:
        return None
    # seconds() grows with the epochs: the first count from the top that fits is the most
    fit = next((e for e in range(config.epochs - 1, 0, -1) if seconds(epochs=e) <= limit), 0)
    said = f"This run needs about {needed} s of GPU, and one ZeroGPU call allows {limit} s"
    lighter = ", or train a linear probe (its features are computed once)" if (
        config.mode != "linear" and seconds(mode="linear") <= limit) else ""
    if fit:
        return (f"{said}. Lower the epochs (at most {fit} fit), the number of images or the "
                f"resolution{lighter}.")
    return (f"{said}: even one epoch is too long. Lower the number of images or the "
            f"resolution{lighter}.")


def finetune(model: nn.Module, train_set: ImageSet, val_set: ImageSet, config: FinetuneConfig,
             cancel: threading.Event | None = None,
             on_event: Callable[[TrainEvent], None] | None = None, **kwargs) -> FinetuneResult:
    """`run_finetune` to the end; ``on_event`` sees every event (a callback-style API)."""
    event = None
    for event in run_finetune(model, train_set, val_set, config, cancel, **kwargs):
        if on_event is not None:
            on_event(event)
    return event.result


# ---------------------------------------------------------------------------------------
# Full / partial fine-tuning
# ---------------------------------------------------------------------------------------


def _train_network(accelerator, model, train_set, val_set, data_config, config, cancel, result):
    train_loader = make_loader(PixelDataset(train_set, data_config, result.resolution,
                                            augment=config.augment),
                               config.batch_size, shuffle=True, seed=config.seed)
    val_loader = make_loader(PixelDataset(val_set, data_config, result.resolution),
                             config.feature_batch_size, shuffle=False)
    yield from _fit(accelerator, model, train_loader, val_loader, config, cancel, result)


def _fit(accelerator: Accelerator, module: nn.Module, train_loader: DataLoader,
         val_loader: DataLoader, config: FinetuneConfig, cancel: threading.Event,
         result: FinetuneResult) -> Iterator[TrainEvent]:
    """Epochs of the shared loop core (`explorer.training`), an evaluation after each."""
    train_loader = accelerator.prepare(train_loader)  # this process's shard from here on
    steps_per_epoch = math.ceil(len(train_loader) / config.grad_accum)
    local_total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        local_total = min(local_total, config.max_steps)
    recipe = Recipe(lr=config.peak_lr, total_steps=local_total, weight_decay=config.decay,
                    warmup_steps=warmup_steps(local_total, config.warmup_frac))
    loop = TrainLoop(module, recipe, cancel=cancel, accelerator=accelerator)
    module, val_loader = loop.model, accelerator.prepare(val_loader)

    def loss_fn(model, batch):
        inputs, labels, _ = batch
        logits = model(inputs)
        loss = F.cross_entropy(logits, labels)
        return loss, {"loss_sum": loss.item() * len(labels), "n": len(labels),
                      "correct": int((logits.argmax(-1) == labels).sum())}

    seen = 0
    for epoch in range(config.epochs):
        for event in loop.fit(train_loader, loss_fn,
                              until=min(local_total, (epoch + 1) * steps_per_epoch)):
            seen += event.stats["n"]
            metrics = {"step": event.step, "epoch": event.step / steps_per_epoch,
                       "loss": event.stats["loss_sum"] / event.stats["n"],
                       "acc": event.stats["correct"] / event.stats["n"], "lr": event.lr,
                       "images": seen, "time": event.seconds}
            result.history.append(metrics)
            yield TrainEvent("train", event.step, local_total, metrics)
        if loop.cancelled:
            result.cancelled = True
            break
        yield from _evaluate(accelerator, module, val_loader, result, loop.step, steps_per_epoch)
        if loop.step >= local_total:
            break
    result.timings["train"] = loop.seconds
    result.timings["train_images_per_s"] = seen / loop.seconds if loop.seconds else float("nan")
    if not result.cancelled and (not result.history or "val_acc" not in result.history[-1]):
        yield from _evaluate(accelerator, module, val_loader, result, loop.step,
                             steps_per_epoch)


@torch.no_grad()
def _evaluate(accelerator, module, val_loader, result, step, steps_per_epoch):
    start = time.perf_counter()
    module.eval()
    preds, labels_all, index_all, loss_sum = [], [], [], 0.0
    for inputs, labels, index in val_loader:
        logits = module(inputs)
        logits, labels, index = accelerator.gather_for_metrics((logits, labels, index))
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        preds.append(logits.argmax(-1).cpu())
        labels_all.append(labels.cpu())
        index_all.append(index.cpu())
    order = torch.cat(index_all).argsort()
    yield _record_eval(result, torch.cat(labels_all)[order].cpu().numpy(),
                       torch.cat(preds)[order].cpu().numpy(), loss_sum / len(order), step,
                       steps_per_epoch, start)


def _record_eval(result: FinetuneResult, labels: np.ndarray, preds: np.ndarray,
                 val_loss: float, step: int, steps_per_epoch: int, start: float) -> TrainEvent:
    """Store one evaluation (in validation-set order) in ``result``; its event."""
    result.val_preds, result.val_labels = preds, labels
    result.val_acc = float((preds == labels).mean())
    result.confusion = confusion_matrix(labels, preds, len(result.classes))
    metrics = {"step": step, "epoch": step / steps_per_epoch, "val_loss": val_loss,
               "val_acc": result.val_acc}
    result.history.append(metrics)
    result.timings["eval"] = result.timings.get("eval", 0.0) + time.perf_counter() - start
    return TrainEvent("eval", step, step, metrics)


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int counts: rows are true classes, columns predicted ones."""
    flat = np.asarray(labels) * num_classes + np.asarray(preds)
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


# ---------------------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------------------


def _linear_probe(accelerator, model, train_set, val_set, data_config, config, cancel, result,
                  model_key):
    start = time.perf_counter()
    features = {}
    for name, images in (("train", train_set), ("val", val_set)):
        key = feature_key(model, model_key, images, result.resolution)
        cached = FEATURE_CACHE.get(key)
        if cached is None:
            loader = make_loader(PixelDataset(images, data_config, result.resolution),
                                 config.feature_batch_size, shuffle=False)
            extraction = extract_features(accelerator, model, loader, cancel)
            cached = yield from _relay(extraction, f"features ({name})")
            if cached is None:  # cancelled
                result.cancelled = True
                return
            FEATURE_CACHE.put(key, cached)
        else:
            result.feature_cache_hit = True
        features[name] = cached
    result.timings["features"] = time.perf_counter() - start

    # The head is tiny: every process trains the same one on all the features (no sharding).
    device = accelerator.device
    train_x, val_x = features["train"].to(device), features["val"].to(device)
    train_y = torch.as_tensor(train_set.labels, device=device)
    batch = min(config.batch_size, len(train_set))
    steps_per_epoch = math.ceil(len(train_set) / batch)
    steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        steps = min(steps, config.max_steps)
    recipe = replace(PROBE_RECIPE, steps=steps, lr=config.peak_lr, weight_decay=config.decay,
                     batch_size=batch, seed=config.seed)
    training = train_linear_probe(train_x, train_y, len(train_set.classes), recipe, cancel,
                                  accelerator)
    train_time, start = 0.0, time.perf_counter()
    while True:
        try:
            s = next(training)
        except StopIteration as stop:
            classifier = stop.value
            break
        metrics = {"step": s.step, "epoch": s.step / steps_per_epoch, "loss": s.loss,
                   "acc": s.acc, "lr": s.lr, "images": s.seen,
                   "time": train_time + time.perf_counter() - start}
        result.history.append(metrics)
        yield TrainEvent("train", s.step, s.total, metrics)
        if s.epoch_done and s.step < s.total:  # evaluate after each epoch, as `_fit` does
            train_time += time.perf_counter() - start
            yield _evaluate_probe(s.classifier(), val_x, val_set, result, s.step,
                                  steps_per_epoch)
            start = time.perf_counter()
    train_time += time.perf_counter() - start
    result.timings["train"] = train_time
    result.timings["train_images_per_s"] = (result.history[-1]["images"] / train_time
                                            if train_time and result.history else float("nan"))
    if classifier is None:  # cancelled
        result.cancelled = True
        return
    yield _evaluate_probe(classifier, val_x, val_set, result, steps, steps_per_epoch)
    with torch.no_grad():
        model.head.weight.copy_(classifier.weight.cpu())
        model.head.bias.copy_(classifier.bias.cpu())


@torch.no_grad()
def _evaluate_probe(classifier: nn.Linear, val_x: torch.Tensor, val_set: ImageSet,
                    result: FinetuneResult, step: int, steps_per_epoch: int) -> TrainEvent:
    start = time.perf_counter()
    logits = classifier(val_x).float()
    labels = np.asarray(val_set.labels)
    val_loss = F.cross_entropy(logits, torch.as_tensor(labels, device=logits.device)).item()
    return _record_eval(result, labels, logits.argmax(-1).cpu().numpy(), val_loss, step,
                        steps_per_epoch, start)


def _relay(extraction, stage: str):
    """Forward a feature extractor's (done, total) progress as events; return its value."""
    try:
        while True:
            done, total = next(extraction)
            yield TrainEvent(stage, done, total)
    except StopIteration as stop:
        return stop.value
