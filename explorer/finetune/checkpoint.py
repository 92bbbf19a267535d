"""Saving fine-tuned models in the local checkpoint format `explorer.models` loads.

A directory with ``model.safetensors`` and ``config.json``; the JSON keeps the keys
`explorer.models.local_checkpoint_files` reads (``architecture``, ``num_classes``,
``img_size``, ``classes``, ``pretrained_cfg``) and adds how the model came to be
(``base_model``, ``resolution``, ``mode``, ``metrics``, ``created_utc``, ``train_config``).
A linear probe after block K (``probe_block``) saves a model truncated to K blocks, with
``model_kwargs: {"depth": K}`` so that ``load_vit`` builds the same shorter timm ViT; a probe
of the mean patch token (``probe_pool="avg"``) adds ``global_pool: "avg", fc_norm: false``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import timm
from safetensors.torch import save_file

from explorer.finetune.engine import FinetuneConfig, FinetuneResult
from explorer.models import cache_dir, register_local_model


def finetuned_dir() -> Path:
    """Where the tab keeps its checkpoints: ``<cache>/finetuned``."""
    return cache_dir() / "finetuned"


def checkpoint_config(result: FinetuneResult, base_model: str, config: FinetuneConfig) -> dict:
    """The ``config.json`` content for a fine-tuned model."""
    model = result.model
    data_config = timm.data.resolve_model_data_config(model)
    height, width = result.resolution
    architecture = model.pretrained_cfg.get("architecture")
    if not architecture:
        raise ValueError("the model's pretrained_cfg does not name its timm architecture")
    meta = {
        "architecture": architecture,
        "num_classes": len(result.classes),
        "img_size": [height, width],
        "classes": list(result.classes),
        "pretrained_cfg": {
            "mean": list(data_config["mean"]),
            "std": list(data_config["std"]),
            "input_size": [3, height, width],
            "interpolation": data_config.get("interpolation", "bicubic"),
            "crop_pct": 1.0,
        },
        "base_model": base_model,
        "resolution": [height, width],
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
    kwargs = {}
    if config.probe_block is not None:  # truncated: rebuild with as many blocks as were kept
        kwargs["depth"] = len(model.blocks)
    if config.probe_pool is not None:  # the pooling the probe read (norm before pooling)
        kwargs.update(global_pool=model.global_pool, fc_norm=False)
    if kwargs:
        meta["model_kwargs"] = kwargs
    return meta


def save_checkpoint(result: FinetuneResult, out_dir: str | os.PathLike, base_model: str,
                    config: FinetuneConfig) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``out_dir`` (created; atomic rename).

    Returns:
        The checkpoint directory, loadable with ``load_vit(f"local:{out_dir}")``.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    meta = checkpoint_config(result, base_model, config)
    (tmp / "config.json").write_text(json.dumps(meta, indent=2, default=float))
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


def publish(out_dir: Path, label: str) -> str:
    """Register the checkpoint so it shows in every model picker; returns its picker name."""
    return register_local_model(f"fine-tuned: {label}", out_dir)


def zip_checkpoint(out_dir: Path) -> Path:
    """``<out_dir>.zip`` holding the checkpoint folder, for download."""
    archive = out_dir.with_suffix(".zip")
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in ("model.safetensors", "config.json"):
            zf.write(out_dir / name, f"{out_dir.name}/{name}")
    return archive
