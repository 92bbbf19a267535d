"""Frozen features and linear probes: the cache behind linear-probe mode, and probe vs depth.

A linear probe measures how linearly separable a frozen representation is (iGPT's and
DINOv2's headline numbers are linear probes). `layerwise_probe` fits one probe per block and
reproduces iGPT's observation that for generative models the best features sit in the middle
of the network, while for discriminative / self-distilled ViTs they keep improving with depth.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from explorer.datasets import ImageSet


class FeatureCache:
    """A small, thread-safe LRU of feature tensors (CPU), keyed by weights + data + size."""

    def __init__(self, max_entries: int = 6):
        self.max_entries = max_entries
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: torch.Tensor) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


FEATURE_CACHE = FeatureCache()


def weights_fingerprint(model: nn.Module) -> str:
    """A cheap key for the frozen backbone: architecture + a hash of every backbone tensor."""
    digest = hashlib.sha1(str(model.pretrained_cfg.get("architecture")).encode())
    for name, tensor in model.state_dict().items():
        if not name.startswith("head."):
            digest.update(name.encode())
            digest.update(tensor.detach().float().sum().cpu().numpy().tobytes())
    return digest.hexdigest()


def feature_key(model: nn.Module, model_key: str | None, images: ImageSet,
                size: tuple[int, int]) -> str:
    """Cache key: which weights (and how many of their blocks), which images, which size."""
    who = model_key or weights_fingerprint(model)
    depth, pool = len(model.blocks), getattr(model, "global_pool", "")
    return f"{who}|{depth}blocks|{pool}|{size[0]}x{size[1]}|{images.fingerprint()}"


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
        if prefix is not None and getattr(model, "has_class_token", False):
            parts.insert(0, prefix[:, 0])
        out.append(torch.cat(parts, -1))
    return torch.stack(out, 1)


def fit_linear_classifier(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int,
                          steps: int = 300, lr: float = 0.05, weight_decay: float = 1e-4,
                          seed: int = 0) -> nn.Linear:
    """Multinomial logistic regression, full batch with Adam on standardised features.

    Args:
        train_x: (N, F) features; train_y: (N,) labels.

    Returns:
        A linear layer on the raw (unstandardised) features: standardisation is folded in.
    """
    generator = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    x = (train_x - mean) / std
    linear = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.01)
        linear.bias.zero_()
    optimizer = torch.optim.Adam(linear.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(linear(x), train_y)
        loss = loss + weight_decay * linear.weight.square().sum()
        loss.backward()
        optimizer.step()
    folded = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        folded.weight.copy_(linear.weight / std)
        folded.bias.copy_(linear.bias - folded.weight @ mean)
    return folded


def probe_accuracy(linear: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((linear(x).argmax(-1) == y).float().mean())


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


def layerwise_probe(
    features_fn: Callable[[torch.Tensor], torch.Tensor],
    train_batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    val_batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    model_name: str = "",
    cancel: threading.Event | None = None,
    steps: int = 300,
) -> Iterator[tuple[str, int, LayerwiseProbe | None]]:
    """Fit one linear probe per block of a frozen model.

    Works for any model through ``features_fn`` (the ViT: `layer_features`; iGPT: its own
    per-layer pooled activations), so both curves come from the same procedure.

    Args:
        features_fn: (B, ...) inputs -> (B, L, F) per-layer features (called under no_grad).
        train_batches, val_batches: iterables of (inputs, labels).
        num_classes: number of classes.

    Yields:
        ("features", batches done, None) while extracting, ("probe", layers done, None) while
        fitting, and finally ("done", L, `LayerwiseProbe`); stops early if ``cancel`` is set.
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
    (train_x, train_y), (val_x, val_y) = feats["train"], feats["val"]
    train_acc, val_acc = [], []
    for layer in range(train_x.shape[1]):
        if cancel is not None and cancel.is_set():
            return
        linear = fit_linear_classifier(train_x[:, layer], train_y, num_classes, steps=steps)
        train_acc.append(probe_accuracy(linear, train_x[:, layer], train_y))
        val_acc.append(probe_accuracy(linear, val_x[:, layer], val_y))
        yield "probe", layer + 1, None
    depths = list(range(1, train_x.shape[1] + 1))
    yield "done", len(depths), LayerwiseProbe(depths, train_acc, val_acc, model_name)


def vit_layerwise_probe(model: nn.Module, train_set: ImageSet, val_set: ImageSet,
                        size: tuple[int, int], batch_size: int = 64, model_name: str = "",
                        cancel: threading.Event | None = None, steps: int = 300
                        ) -> Iterator[tuple[str, int, LayerwiseProbe | None]]:
    """`layerwise_probe` for a timm ViT at resolution ``size`` (frozen, eval mode).

    Yields the same progress tuples; features come from `layer_features`.
    """
    from timm.data import resolve_model_data_config

    from explorer.finetune.data import PixelDataset, make_loader

    model.eval()
    data_config = resolve_model_data_config(model)

    def batches(images: ImageSet):
        loader = make_loader(PixelDataset(images, data_config, size), batch_size, shuffle=False)
        return ((pixels, labels) for pixels, labels, _ in loader)

    yield from layerwise_probe(lambda x: layer_features(model, x), batches(train_set),
                               batches(val_set), len(train_set.classes), model_name, cancel,
                               steps)
