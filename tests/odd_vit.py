"""A small timm ViT of unusual shape, saved in timm's own layout and reachable by name.

Three blocks, five heads, 16 px patches, one register token and no class token
(average-pooled, with a classifier head), trained at 64 px: every count differs from the
default model's, so a control or label that still assumes 12 layers, 6 heads, a class
token or 224 px shows up. Builds in milliseconds, nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch

from explorer import models

NAME = "odd-vit (test)"
DEPTH, HEADS, PATCH, SIZE, CLASSES = 3, 5, 16, 64, 4
ARGS = dict(depth=DEPTH, num_heads=HEADS, embed_dim=80, patch_size=PATCH, img_size=SIZE,
            reg_tokens=1, class_token=False, global_pool="avg", num_classes=CLASSES)
CLASS_NAMES = ["ant", "bee", "cat", "dog"]


def odd_vit(seed: int = 0) -> torch.nn.Module:
    """The odd-shaped ViT with seeded random weights (eval mode, CPU)."""
    torch.manual_seed(seed)
    # dynamic_img_size is how explorer.models builds every ViT (any multiple of the patch).
    model = timm.create_model("vit_small_patch16_224", pretrained=False, dynamic_img_size=True,
                              **ARGS).eval()
    # The data config travels with the weights: trained at SIZE px, not the 224 of the
    # architecture's default entry.
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, SIZE, SIZE)}
    return model


def save_odd_vit(directory: Path, seed: int = 0) -> torch.nn.Module:
    """Write the model with timm's `save_for_hf` (config.json + model.safetensors)."""
    model = odd_vit(seed)
    timm.models.save_for_hf(model, str(directory), model_config={"label_names": CLASS_NAMES},
                            model_args=ARGS, safe_serialization=True)
    return model


def register_odd_vit(directory: Path, name: str = NAME, seed: int = 0) -> str:
    """Save the model into ``directory`` and register it for every model picker as ``name``."""
    save_odd_vit(Path(directory), seed)
    return models.register_local_model(name, directory)
