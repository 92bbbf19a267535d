"""Frozen features and linear probes: the feature cache, the one probe trainer, probe vs depth.

A linear probe measures how linearly separable a frozen representation is (iGPT's and
DINOv2's headline numbers are linear probes). `layerwise_probe` fits one probe per block and
reproduces iGPT's observation that for generative models the best features sit in the middle
of the network, while for discriminative / self-distilled ViTs they keep improving with depth.

The probes are fitted where the GPU is (`explorer.gpu.stream_on_device`: in a ZeroGPU worker
on a ZeroGPU Space), and so are a ViT's features (`vit_layerwise_probe`: features and probes
in one GPU call).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from explorer import gpu, models
from explorer.cache import KeyedCache, weights_fingerprint
from explorer.datasets import ImageSet
from explorer.patches import grid_for, has_class_token, patch_size
from explorer.training import Recipe, TrainLoop, make_accelerator

# Frozen features (CPU tensors), six sets at most: a train/val pair for three models or sizes.
FEATURE_CACHE: KeyedCache[torch.Tensor] = KeyedCache(max_items=6)


def feature_key(model: nn.Module, model_key: str | None, images: ImageSet,
                size: tuple[int, int]) -> str:
    """Cache key: which weights (and how many of their blocks), which images, which size.

    The backbone's weights fingerprint is always part of it (``model_key``, a name, only
    labels the entry), so a checkpoint re-saved under the same name never reads stale
    features; the classifier is left out, as pre-logits features do not depend on it.
    """
    who = f"{model_key or ''}#{weights_fingerprint(model, ('head.',))}"
    depth, pool = len(model.blocks), getattr(model, "global_pool", "")
    return f"{who}|{depth}blocks|{pool}|{size[0]}x{size[1]}|{images.fingerprint()}"


def forward_flops(model: nn.Module, size: tuple[int, int]) -> float:
    """FLOPs of one forward pass of one image at ``size`` (height, width): 2 × parameters ×
    tokens (patches + prefix tokens), the usual estimate for a transformer."""
    rows, cols = grid_for(size, patch_size(model))
    tokens = rows * cols + model.num_prefix_tokens
    return 2 * sum(p.numel() for p in model.parameters()) * tokens


def pre_logits(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, D): what the model's head sees (pooled, normed)."""
    return model.forward_head(model.forward_features(pixels), pre_logits=True)


@torch.no_grad()
def extract_features(accelerator, model: nn.Module, loader: DataLoader,
                     cancel: threading.Event | None = None,
                     fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] = pre_logits
                     ) -> Iterator[tuple[int, int]]:
    """Run the frozen ``model`` over a loader of ``(pixels, label, index)`` batches.

    The backbone is not wrapped for data parallelism (nothing to synchronise); each process
    takes its shard of the loader and the features are gathered.

    Yields:
        (batches done, batches total) after each batch.

    Returns:
        (N, D) float32 CPU features in dataset order, or None if cancelled.
    """
    model.eval().to(accelerator.device)
    loader = accelerator.prepare_data_loader(loader)
    chunks, indices = [], []
    for i, (pixels, _, index) in enumerate(loader):
        if cancel is not None and cancel.is_set():
            return None
        with accelerator.autocast():
            features = fn(model, pixels).float()
        features, index = accelerator.gather_for_metrics((features, index))
        chunks.append(features.cpu())
        indices.append(index.cpu())
        yield i + 1, len(loader)
    return torch.cat(chunks)[torch.cat(indices).argsort()]


def layer_features(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Per-block features for probing: the class token and the mean patch token, each after
    the final norm (the representation the head would see, taken early).

    Args:
        pixels: (B, 3, H, W).

    Returns:
        (B, L, F) with L blocks and F = 2 * D with a class token, else D.
    """
    per_block = model.forward_intermediates(
        pixels, indices=len(model.blocks), norm=True, output_fmt="NLC",
        return_prefix_tokens=True, intermediates_only=True)
    out = []
    for item in per_block:  # (patches (B, N, D), prefix (B, P, D)) or patches alone
        patches, prefix = item if isinstance(item, tuple) else (item, None)
        parts = [patches.mean(1)]
        if prefix is not None and has_class_token(model):
            parts.insert(0, prefix[:, 0])
        out.append(torch.cat(parts, -1))
    return torch.stack(out, 1)


@dataclass(frozen=True)
class ProbeRecipe:
    """How every linear probe here is trained: the fine-tune engine's linear mode and the
    layer-wise probes (ViT and iGPT) all call `train_linear_probe` with this recipe.

    Multinomial logistic regression on frozen features. The features are standardised with
    the training set's mean and std (as MAE's linear probe does with a parameter-free
    BatchNorm), so one learning rate suits every model, layer and feature scale; the
    standardisation is folded into the returned layer, which reads raw features. The head
    starts at zero: the problem is convex, so there is no symmetry to break, and zero is the
    uniform prediction. AdamW with a cosine decay to zero over the run and no warm-up (a zero
    head on unit-variance inputs has no large early gradients to tame).

    Attributes:
        steps: optimiser steps; the layer-wise probes use this default, the engine sets
            epochs x batches per epoch.
        lr: peak learning rate. Adam's steps are about ``lr`` per weight whatever the
            gradient's scale, and standardised features need weights of order one: 1e-2
            over a few hundred steps gets there, and keeps minibatch noise small.
        weight_decay: AdamW's decoupled decay of the weight (not the bias): a light pull
            that keeps separable data from driving the weights to infinity.
        batch_size: examples per step; None = the whole training set (full batch, no
            shuffle: the result does not depend on the seed).
        seed: the shuffle of the minibatches.
    """

    steps: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-4
    batch_size: int | None = None
    seed: int = 0


PROBE_RECIPE = ProbeRecipe()


@dataclass
class ProbeStep:
    """Progress of `train_linear_probe` after one optimiser step.

    Attributes:
        step, total: steps done and planned.
        loss, acc: cross-entropy and accuracy of this step's batch (before the update).
        lr: the learning rate this step used.
        seen: training examples read so far.
        epoch_done: this step finished a pass over the training set.
        classifier: the probe as it stands, folded (raw features -> logits).
    """

    step: int
    total: int
    loss: float
    acc: float
    lr: float
    seen: int
    epoch_done: bool
    classifier: Callable[[], nn.Linear]


def train_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int,
                       recipe: ProbeRecipe = PROBE_RECIPE,
                       cancel: threading.Event | None = None,
                       accelerator: Accelerator | None = None,
                       ) -> Generator[ProbeStep, None, nn.Linear | None]:
    """The one linear-probe trainer (see `ProbeRecipe` for the recipe and its reasons), on
    the loop core every trainer shares (`explorer.training.TrainLoop`: its AdamW, schedule
    and cancel rule).

    Runs where ``accelerator`` places it (the fine-tune run's own; by default
    `training.make_accelerator`'s: CUDA when present, the CPU in a ZeroGPU app's process),
    in its precision (the app's rule: fp32 on a CPU, bf16 autocast on a GPU); the features
    go there.

    Args:
        train_x: (N, F) frozen features; train_y: (N,) int labels in [0, num_classes).
        recipe: steps, learning rate, weight decay, batch size, seed.
        cancel: set it to stop before the next step.
        accelerator: the run's accelerator (None: a new one, the app's rule).

    Yields:
        A `ProbeStep` after every step.

    Returns:
        The trained probe as an ``nn.Linear`` on raw features (standardisation folded in),
        or None when cancelled.
    """
    n, dim = train_x.shape
    linear = nn.Linear(dim, num_classes)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    # the bias is not decayed (a 1-D parameter); no warm-up: cosine from the first step
    loop = TrainLoop(linear, Recipe(lr=recipe.lr, total_steps=recipe.steps,
                                    weight_decay=recipe.weight_decay,
                                    decay_norms_and_biases=False),
                     cancel=cancel, accelerator=accelerator or make_accelerator())
    x = train_x.to(loop.device).float()
    mean, std = x.mean(0), x.std(0, correction=0).clamp_min(1e-6)
    z = (x - mean) / std  # (N, F) unit variance per feature
    y = train_y.to(loop.device, torch.long)
    batch = n if recipe.batch_size is None else max(1, min(recipe.batch_size, n))
    per_epoch = math.ceil(n / batch)

    def batches() -> Iterator[torch.Tensor]:
        """Each step's example indices: a fresh seeded shuffle each epoch (none at full
        batch, where the result does not depend on the seed)."""
        generator = torch.Generator().manual_seed(recipe.seed)
        order = torch.arange(n)
        for step in range(recipe.steps):
            i = step % per_epoch
            if i == 0 and batch < n:
                order = torch.randperm(n, generator=generator)
            yield order[i * batch:(i + 1) * batch].to(loop.device)

    def loss_fn(model: nn.Module, index: torch.Tensor):
        logits = model(z[index])
        correct = int((logits.argmax(-1) == y[index]).sum())
        return F.cross_entropy(logits, y[index]), {"correct": correct, "n": len(index)}

    def classifier() -> nn.Linear:
        return fold_standardisation(loop.unwrapped, mean, std)

    seen = 0
    for event in loop.fit(batches(), loss_fn):
        seen += event.stats["n"]
        yield ProbeStep(event.step, recipe.steps, event.loss,
                        event.stats["correct"] / event.stats["n"], event.lr, seen,
                        event.step % per_epoch == 0, classifier)
    return None if loop.cancelled else classifier()


def fold_standardisation(linear: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> nn.Linear:
    """A layer on raw features equal to ``linear`` on standardised ones:
    W (f - mean) / std + b = (W / std) f + (b - (W / std) mean)."""
    folded = nn.Linear(linear.in_features, linear.out_features).to(linear.weight.device)
    with torch.no_grad():
        folded.weight.copy_(linear.weight / std)
        folded.bias.copy_(linear.bias - folded.weight @ mean)
    return folded.requires_grad_(False)


def fit_linear_classifier(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int,
                          recipe: ProbeRecipe = PROBE_RECIPE) -> nn.Linear:
    """`train_linear_probe` run to the end: the probe on raw features.

    Args:
        train_x: (N, F) features; train_y: (N,) labels.
    """
    training = train_linear_probe(train_x, train_y, num_classes, recipe)
    while True:
        try:
            next(training)
        except StopIteration as done:
            return done.value


def probe_accuracy(linear: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of rows of ``x`` (N, F) whose argmax logit is the label in ``y`` (N,)."""
    with torch.no_grad():
        return (linear(x).argmax(-1) == y).sum().item() / len(y)


@dataclass
class LayerwiseProbe:
    """Probe accuracy against depth.

    Attributes:
        depths: 1..L (block index + 1).
        train_acc, val_acc: accuracy of each block's probe.
        model_name: for plot titles.
    """

    depths: list[int]
    train_acc: list[float]
    val_acc: list[float]
    model_name: str = ""

    @property
    def best_depth(self) -> int:
        return self.depths[max(range(len(self.val_acc)), key=self.val_acc.__getitem__)]


@dataclass
class LayerFeatures:
    """Frozen per-layer features of a training and a validation split, on the CPU.

    Attributes:
        train_x, val_x: (N, L, F) features of L layers.
        train_y, val_y: (N,) int labels.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor


def extract_layer_features(
    features_fn: Callable[[torch.Tensor], torch.Tensor],
    train_batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    val_batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    cancel: threading.Event | None = None,
) -> Iterator[tuple[str, int, LayerFeatures | None]]:
    """The first half of `layerwise_probe`: every batch through ``features_fn``.

    Yields:
        ("features", batches done, None) after each batch, then ("extracted", batches done,
        `LayerFeatures`); stops early, without the last, if ``cancel`` is set.
    """
    feats = {}
    done = 0
    for split, batches in (("train", train_batches), ("val", val_batches)):
        xs, ys = [], []
        for inputs, labels in batches:
            if cancel is not None and cancel.is_set():
                return
            with torch.no_grad():
                xs.append(features_fn(inputs).float().cpu())
            ys.append(torch.as_tensor(labels))
            done += 1
            yield "features", done, None
        feats[split] = (torch.cat(xs), torch.cat(ys))
    yield "extracted", done, LayerFeatures(*feats["train"], *feats["val"])


# A linear probe's optimiser step where the GPU is: ~40 kernel launches (the linear layer,
# the loss, their backward, AdamW's update of two tensors) and two `.item()` syncs, against
# the ~10^3 launches of a network's step (`explorer.gpu.STEP_S`, 0.02 s): an upper estimate,
# not timed on a GPU, like the sizing rule's own. Its FLOPs (6 x rows x features x classes)
# are microseconds at `explorer.gpu.GPU_FLOPS`.
PROBE_STEP_S = 2e-3


def fit_layer_probes(features: LayerFeatures, num_classes: int, model_name: str = "",
                     steps: int = 300, cancel: threading.Event | None = None
                     ) -> Iterator[tuple[str, int, LayerwiseProbe | None]]:
    """The second half of `layerwise_probe`: one linear probe per layer of ``features``, on
    `explorer.models.default_device` (optimiser steps must not run in a ZeroGPU Space's own
    process: AdamW's step asks torch for the current CUDA stream, which starts CUDA).

    Yields:
        ("probe", layers done, None) after each layer, then ("done", L, `LayerwiseProbe`);
        stops early if ``cancel`` is set.
    """
    device = models.default_device()
    recipe = replace(PROBE_RECIPE, steps=steps)
    train_y, val_y = features.train_y.to(device), features.val_y.to(device)
    train_acc, val_acc = [], []
    for layer in range(features.train_x.shape[1]):
        if cancel is not None and cancel.is_set():
            return
        train_x = features.train_x[:, layer].to(device)
        val_x = features.val_x[:, layer].to(device)
        linear = fit_linear_classifier(train_x, train_y, num_classes, recipe)
        train_acc.append(probe_accuracy(linear, train_x, train_y))
        val_acc.append(probe_accuracy(linear, val_x, val_y))
        yield "probe", layer + 1, None
    depths = list(range(1, features.train_x.shape[1] + 1))
    yield "done", len(depths), LayerwiseProbe(depths, train_acc, val_acc, model_name)


def fit_seconds(layers: int, steps: int) -> float:
    """GPU seconds of `fit_layer_probes`: ``layers`` probes of ``steps`` steps each."""
    return layers * steps * PROBE_STEP_S


def _probe_extracted(extraction: Iterator[tuple[str, int, LayerFeatures | None]],
                     fit: Callable[[LayerFeatures], Iterator]
                     ) -> Iterator[tuple[str, int, LayerwiseProbe | None]]:
    """``extraction``'s progress, then ``fit(features)``'s (no features: it was cancelled)."""
    features = None
    for stage, done, value in extraction:
        if stage == "extracted":
            features = value
        else:
            yield stage, done, None
    if features is not None:
        yield from fit(features)


def layerwise_probe(
    features_fn: Callable[[torch.Tensor], torch.Tensor],
    train_batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    val_batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    model_name: str = "",
    cancel: threading.Event | None = None,
    steps: int = 300,
) -> Iterator[tuple[str, int, LayerwiseProbe | None]]:
    """Fit one linear probe per block of a frozen model: `extract_layer_features` here, then
    `fit_layer_probes` where the GPU is (a ZeroGPU call on a ZeroGPU Space, sized by
    `fit_seconds`; ``cancel`` closes it).

    Works for any model through ``features_fn`` (the ViT: `layer_features`; iGPT: its own
    per-layer pooled activations), so both curves come from the same procedure.

    Args:
        features_fn: (B, ...) inputs -> (B, L, F) per-layer features (called under no_grad).
        train_batches, val_batches: iterables of (inputs, labels).
        num_classes: number of classes.
        steps: optimiser steps of each layer's probe (the rest is `PROBE_RECIPE`).

    Yields:
        ("features", batches done, None) while extracting, ("probe", layers done, None) while
        fitting, and finally ("done", L, `LayerwiseProbe`); stops early if ``cancel`` is set.
    """
    cancel = cancel or threading.Event()

    def fit(features: LayerFeatures) -> Iterator:
        if cancel.is_set():
            return iter(())
        seconds = gpu.training_seconds(0, seconds=fit_seconds(features.train_x.shape[1], steps))
        return gpu.stream_on_device(fit_layer_probes, features, num_classes, model_name, steps,
                                    cancel=cancel, seconds=seconds)

    extraction = extract_layer_features(features_fn, train_batches, val_batches, cancel)
    yield from _probe_extracted(extraction, fit)


def vit_layer_features(model: nn.Module, train_set: ImageSet, val_set: ImageSet,
                       size: tuple[int, int], batch_size: int = 64,
                       cancel: threading.Event | None = None
                       ) -> Iterator[tuple[str, int, LayerFeatures | None]]:
    """`extract_layer_features` of a timm ViT at resolution ``size`` (frozen, eval mode), on
    `explorer.models.default_device` (CUDA on a dedicated GPU and in a ZeroGPU worker); the model
    is left on the device it came on."""
    from timm.data import resolve_model_data_config

    from explorer.finetune.data import PixelDataset, make_loader

    device, home = models.default_device(), next(model.parameters()).device
    model.eval().to(device)
    data_config = resolve_model_data_config(model)

    def batches(images: ImageSet):
        loader = make_loader(PixelDataset(images, data_config, size), batch_size, shuffle=False)
        return ((pixels.to(device), labels) for pixels, labels, _ in loader)

    try:
        yield from extract_layer_features(lambda x: layer_features(model, x), batches(train_set),
                                          batches(val_set), cancel)
    finally:
        model.to(home)


def _vit_layerwise(model: nn.Module, train_set: ImageSet, val_set: ImageSet,
                   size: tuple[int, int], batch_size: int, model_name: str, steps: int,
                   cancel: threading.Event | None = None
                   ) -> Iterator[tuple[str, int, LayerwiseProbe | None]]:
    """`vit_layer_features`, then `fit_layer_probes`: the whole probe in one GPU call."""
    extraction = vit_layer_features(model, train_set, val_set, size, batch_size, cancel)
    yield from _probe_extracted(extraction, lambda features: fit_layer_probes(
        features, len(train_set.classes), model_name, steps, cancel))


def layerwise_seconds(model: nn.Module, n_train: int, n_val: int, size: tuple[int, int],
                      batch_size: int = 64, steps: int = 300) -> int:
    """The ZeroGPU duration to ask for a ViT's layer-wise probe (`explorer.gpu.training_seconds`):
    each feature batch a launch-bound step, every image through the data path at ``size`` and
    one forward pass of the whole model (`forward_flops`), then a probe of ``steps`` steps
    per block (`fit_seconds`)."""
    batches = math.ceil(n_train / batch_size) + math.ceil(n_val / batch_size)
    images = n_train + n_val
    return gpu.training_seconds(batches, images, size[0] * size[1],
                                images * forward_flops(model, size),
                                seconds=fit_seconds(len(model.blocks), steps))


def vit_layerwise_probe(model: nn.Module, train_set: ImageSet, val_set: ImageSet,
                        size: tuple[int, int], batch_size: int = 64, model_name: str = "",
                        cancel: threading.Event | None = None, steps: int = 300
                        ) -> Iterator[tuple[str, int, LayerwiseProbe | None]]:
    """`layerwise_probe` for a timm ViT at resolution ``size`` (frozen, eval mode), features
    and probes where the GPU is: on a ZeroGPU Space one GPU call, sized by
    `layerwise_seconds` (``cancel`` closes it). Yields the same progress tuples."""
    cancel = cancel or threading.Event()
    return gpu.stream_on_device(
        _vit_layerwise, model, train_set, val_set, size, batch_size, model_name, steps,
        cancel=cancel,
        seconds=layerwise_seconds(model, len(train_set), len(val_set), size, batch_size, steps))
