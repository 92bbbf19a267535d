"""Which iGPT models exist and how to load them: a catalogue as data, one bounded cache.

Loaded models live in `IGPT_CACHE` (an `explorer.cache.KeyedCache`): at most three, and two
first requests for one model load it once (a hub model can be GBs).

- the offline default, trained here on Fashion-MNIST, in `assets/igpt/`;
- OpenAI's `openai/imagegpt-small|medium|large` through transformers, from the Hugging Face
  Hub (needs internet), with their own 512 k-means colour clusters;
- any local directory in the same format (config.json + model.safetensors or
  pytorch_model.bin + preprocessor_config.json, as `save_pretrained` writes them).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from explorer import hub
from explorer.cache import KeyedCache
from explorer.errors import ModelUnavailableError
from explorer.igpt.model import IGPTConfig, ImageGPT
from explorer.igpt.palette import Palette, cluster_palette, load_palette, save_palette

ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "igpt"
OFFLINE_NAME = "Fashion-MNIST iGPT (trained here, offline)"


@dataclass(frozen=True)
class ModelSpec:
    source: str  # "local" (a directory) or "hub" (a Hugging Face repo id)
    location: str  # directory path or repo id
    note: str = ""
    height: int | None = None  # image side when known before loading (for UI limits)


CATALOGUE: dict[str, ModelSpec] = {
    OFFLINE_NAME: ModelSpec("local", str(ASSET_DIR), "3.7M params, 28×28, 8 grey levels", 28),
    "openai/imagegpt-small": ModelSpec("hub", "openai/imagegpt-small", "76M params, 32×32", 32),
    "openai/imagegpt-medium": ModelSpec("hub", "openai/imagegpt-medium", "455M params, 32×32",
                                        32),
    "openai/imagegpt-large": ModelSpec("hub", "openai/imagegpt-large", "1.4B params, 32×32", 32),
}


@dataclass(frozen=True)
class LoadedIGPT:
    """A model with everything needed to turn images into its tokens and back."""

    name: str
    model: ImageGPT
    palette: Palette
    height: int
    width: int

    @property
    def channels(self) -> int:
        """Image dimensions one token stands for: 1 for grey palettes, 3 for colour."""
        return 1 if self.palette.is_grey else 3


def load_igpt(name: str, fast: bool = False) -> LoadedIGPT:
    """By catalogue name, hub repo id ("owner/name") or local directory path.

    ``fast=True``: the model is `explorer.igpt.fast.fast_decoder`'s copy (int8 weights,
    bfloat16 key/value cache) for quicker sampling from big models; built once and cached.

    Raises:
        ModelUnavailableError: files missing, or a hub model requested without internet.
    """
    spec = CATALOGUE.get(name)
    if spec is None:
        path = Path(name).expanduser()
        if path.is_dir():
            spec = ModelSpec("local", str(path))
        elif "/" in name and not path.exists() and not name.startswith((".", "/", "~")):
            spec = ModelSpec("hub", name)
        else:
            raise ModelUnavailableError(f"No iGPT model called {name!r}: not in the catalogue "
                                        "and not a directory.")
    return _load_cached(spec.source, spec.location, name, fast)


# A hub model can be GBs: a model, its fast copy and one more at most.
IGPT_CACHE: KeyedCache[LoadedIGPT] = KeyedCache(max_items=3)


def _load_cached(source: str, location: str, name: str, fast: bool = False) -> LoadedIGPT:
    def build() -> LoadedIGPT:
        if fast:
            from explorer.igpt.fast import fast_decoder

            base = _load_cached(source, location, name, False)  # the plain load's cache key
            return dataclasses.replace(base, model=fast_decoder(base.model))
        if source == "hub":
            return _load_hub(location, name)
        return load_local(location, name)

    return IGPT_CACHE.get_or_build((source, location, name, fast), build)


def load_local(directory: str | Path, name: str | None = None) -> LoadedIGPT:
    """A directory with config.json, weights and a palette (palette.json or the clusters of
    preprocessor_config.json) -> LoadedIGPT. Image size from preprocessor_config.json."""
    d = Path(directory)
    cfg_path, pre_path = d / "config.json", d / "preprocessor_config.json"
    if not cfg_path.exists() or not pre_path.exists():
        if d.resolve() == ASSET_DIR:
            raise ModelUnavailableError(
                "The offline iGPT model is missing from assets/igpt: train and export it with "
                "`python -m explorer.igpt.train` (see assets/igpt/README.md).")
        raise ModelUnavailableError(
            f"'{d.name}' is not an iGPT checkpoint directory: it needs config.json and "
            "preprocessor_config.json (as written by save_pretrained / explorer.igpt.train).")
    model = ImageGPT(IGPTConfig.from_hf(json.loads(cfg_path.read_text())))
    if (d / "model.safetensors").exists():
        from safetensors.torch import load_file

        state = load_file(d / "model.safetensors")
    elif (d / "pytorch_model.bin").exists():
        state = torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ModelUnavailableError(f"No model.safetensors or pytorch_model.bin in '{d.name}'.")
    state = {k: v for k, v in state.items() if not k.endswith(".attn.bias")}  # old causal masks
    model.load_state_dict(state, strict=True)
    pre = json.loads(pre_path.read_text())
    if (d / "palette.json").exists():
        palette = load_palette(d / "palette.json")
    else:
        palette = cluster_palette(pre["clusters"], name=f"k-means {len(pre['clusters'])} colours")
    return LoadedIGPT(name or str(d), model.eval(), palette, pre["size"]["height"],
                      pre["size"]["width"])


def _load_hub(repo: str, name: str) -> LoadedIGPT:
    """OpenAI's checkpoints through transformers; their clusters come from the image processor."""
    from transformers import ImageGPTForCausalImageModeling, ImageGPTImageProcessor

    cached = _hub_cached(repo)
    if not cached and not hub.reachable():
        raise ModelUnavailableError(
            f"{repo} is not in the local Hugging Face cache and the Hub cannot be reached (no "
            f"internet here?). Offline, use the default model '{OFFLINE_NAME}' or a local "
            "checkpoint directory.")
    try:
        processor = ImageGPTImageProcessor.from_pretrained(repo, local_files_only=cached)
        hf = ImageGPTForCausalImageModeling.from_pretrained(repo, local_files_only=cached)
    except (OSError, ValueError) as e:  # no connection, repo missing, offline mode
        raise ModelUnavailableError(
            f"Could not load {repo} from the Hugging Face Hub ({type(e).__name__}). It needs "
            "internet access the first time (then it is cached). Offline, use the default "
            f"model '{OFFLINE_NAME}' or a local checkpoint directory.") from e
    clusters = torch.as_tensor(processor.clusters, dtype=torch.float32)
    size = processor.size
    height, width = (size["height"], size["width"]) if isinstance(size, dict) else (
        size.height, size.width)
    model = ImageGPT.from_hf(hf)
    return LoadedIGPT(name, model, cluster_palette(clusters, f"OpenAI k-means {len(clusters)}"),
                      height, width)


def _hub_cached(repo: str) -> bool:
    """Whether the repo's config and processor files are already in the local HF cache."""
    return hub.cached(repo, "config.json", "preprocessor_config.json")


def export_pretrained(model: ImageGPT, palette: Palette, directory: str | Path,
                      size: tuple[int, int] | None = None, train_config: dict | None = None
                      ) -> None:
    """Write `model` as transformers ImageGPT (config.json + model.safetensors), its palette as
    the image processor's clusters (preprocessor_config.json) and palette.json.

    size: (height, width); default from train_config["size"] (square).
    """
    from transformers import ImageGPTImageProcessor

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if size is None:
        side = (train_config or {}).get("size")
        if side is None:
            raise ValueError("export_pretrained needs size=(height, width)")
        size = (side, side)
    model.to_hf().save_pretrained(d, safe_serialization=True)
    if palette.centers is None:
        raise ValueError("only cluster palettes (grey levels, k-means) can be exported")
    ImageGPTImageProcessor(clusters=palette.centers.tolist(),
                           size={"height": size[0], "width": size[1]}).save_pretrained(d)
    save_palette(palette, d / "palette.json")
    if train_config is not None:
        (d / "train_config.json").write_text(json.dumps(train_config, indent=2))
