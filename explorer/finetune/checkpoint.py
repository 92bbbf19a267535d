"""Saving fine-tuned models in timm's own checkpoint layout.

`save_checkpoint` writes what `timm.models.save_for_hf` writes: ``model.safetensors`` and a
``config.json`` with ``architecture``, ``num_classes``, ``label_names`` (the class names),
``model_args`` (how to rebuild this very model) and ``pretrained_cfg`` (mean, std, the
training resolution as ``input_size``, crop). So plain timm rebuilds it with identical
logits::

    model = timm.create_model("local-dir:<dir>", pretrained=True)
    model.pretrained_cfg["label_names"]  # the class names

and `explorer.models.load_vit(f"local:{dir}")` loads it the same way. How the model came to
be (base model, mode, metrics, training config) is kept under ``config.json["fine_tune"]``,
which timm ignores. A linear probe after block K (``probe_block``) is a model truncated to K
blocks, recorded as ``model_args["depth"]``; a probe of the mean patch token
(``probe_pool="avg"``) records ``global_pool: "avg", fc_norm: false``.
"""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import timm
from timm.models import save_for_hf

from explorer.finetune.engine import FinetuneConfig, FinetuneResult
from explorer.models import cache_dir


def finetuned_dir() -> Path:
    """Where the tab keeps its checkpoints: ``<cache>/finetuned``."""
    return cache_dir() / "finetuned"


def fine_tune_record(result: FinetuneResult, base_model: str, config: FinetuneConfig) -> dict:
    """How the model came to be: stored as ``config.json["fine_tune"]`` (timm ignores it)."""
    return {
        "base_model": base_model,
        "resolution": list(result.resolution),
        "mode": config.mode,
        "metrics": {
            "val_acc": result.val_acc,
            "val_images": 0 if result.val_labels is None else int(len(result.val_labels)),
            "steps": max((h["step"] for h in result.history), default=0),
            "train_images_per_s": result.timings.get("train_images_per_s"),
        },
        "train_config": asdict(config),
        "timm_version": timm.__version__,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def rebuild_args(result: FinetuneResult, config: FinetuneConfig) -> dict:
    """timm constructor arguments that rebuild the trained model, ``model_args`` in config.json.

    Recent timm records most of these itself (factory arguments, head, input size); the
    engine's own changes after construction (fewer blocks, no ``fc_norm``) it cannot see, and
    older timm records none, so all that shape the weights or the logits are given here.
    """
    model = result.model
    args: dict = {
        "depth": len(model.blocks),  # fewer than built after a probe_block probe
        "img_size": list(model.patch_embed.img_size),  # the grid the position embedding has
        "global_pool": model.global_pool,
    }
    if config.probe_pool is not None:  # the pooling the probe read (norm before pooling)
        args["fc_norm"] = False
    return args


def save_checkpoint(result: FinetuneResult, out_dir: str | os.PathLike, base_model: str,
                    config: FinetuneConfig) -> Path:
    """Write the checkpoint in timm's layout into ``out_dir`` (created; atomic rename).

    Returns:
        The checkpoint directory: ``timm.create_model(f"local-dir:{out_dir}", pretrained=True)``
        or ``load_vit(f"local:{out_dir}")`` rebuild the model.
    """
    out_dir = Path(out_dir)
    model = result.model
    if not model.pretrained_cfg.get("architecture"):
        raise ValueError("the model's pretrained_cfg does not name its timm architecture")
    height, width = result.resolution
    data_config = timm.data.resolve_model_data_config(model)
    # Preprocessing travels with the weights: these weights were trained on whole images (no
    # centre crop) at the training resolution. Written through pretrained_cfg, which every
    # timm with the local-dir: loader saves (save_for_hf's data_config= is newer).
    as_trained = {**model.pretrained_cfg, "input_size": (3, height, width), "crop_pct": 1.0,
                  "mean": tuple(data_config["mean"]), "std": tuple(data_config["std"]),
                  "interpolation": data_config.get("interpolation", "bicubic")}
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    source_cfg, model.pretrained_cfg = model.pretrained_cfg, as_trained
    try:
        save_for_hf(
            model,  # safetensors copies tensors off the GPU itself
            str(tmp),
            model_config={"label_names": list(result.classes),
                          "fine_tune": fine_tune_record(result, base_model, config)},
            model_args=rebuild_args(result, config),
            safe_serialization=True,
        )
    finally:
        model.pretrained_cfg = source_cfg
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def run_name(base_model: str, config: FinetuneConfig, dataset: str) -> str:
    """A readable, file-system-safe name: ``fashion-mnist-linear-112px-0412``."""
    side = "native" if config.resolution is None else f"{config.resolution}px"
    stamp = datetime.now(timezone.utc).strftime("%H%M%S")
    mode = config.mode if config.mode != "last_k" else f"last{config.last_k}"
    if config.probe_block is not None:
        mode += f"-block{config.probe_block}"
    if config.probe_pool is not None:
        mode += f"-{config.probe_pool}"
    name = f"{dataset}-{mode}-{side}-{stamp}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower()


def zip_checkpoint(out_dir: Path) -> Path:
    """``<out_dir>.zip`` holding the checkpoint folder, for download."""
    archive = out_dir.with_suffix(".zip")
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in ("model.safetensors", "config.json"):
            zf.write(out_dir / name, f"{out_dir.name}/{name}")
    return archive
