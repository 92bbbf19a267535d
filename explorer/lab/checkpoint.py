"""Lab models on disk: the grid's shipped state dicts, and a live run's ViT saved in timm's
layout (`timm.models.save_for_hf`) so every model picker can open it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import timm
from safetensors.torch import load_file, save_file
from timm.models import save_for_hf
from torch import nn

from explorer.cache import KeyedCache
from explorer.datasets import FASHION_MNIST_CLASSES
from explorer.lab.engine import LabRun
from explorer.lab.models import build
from explorer.lab.paths import MODELS_DIR

VIT_ARCHS = ("vit", "vit_rel")  # what the attention and distance tabs can open
_SHIPPED: KeyedCache[nn.Module] = KeyedCache(max_items=8)


def shipped_path(run: LabRun, folder: Path | None = None) -> Path:
    """Where the grid keeps ``run``'s model: ``<folder>/<run name>.safetensors``; the folder
    defaults to `MODELS_DIR`, read at each call (so one place moves it, tests included)."""
    return (folder or MODELS_DIR) / f"{run.name}.safetensors"


def save_shipped(model: nn.Module, run: LabRun, folder: Path | None = None) -> Path:
    """Keep a grid run's trained weights (safetensors, atomically) for the tab's views."""
    path = shipped_path(run, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp, metadata={"arch": run.arch, "width": str(run.width),
                                    "depth": str(run.depth), "variant": run.variant})
    os.replace(tmp, path)
    return path


def shipped_version(run: LabRun) -> tuple | None:
    """Which file holds ``run``'s kept model now (name, inode, modification time, size), or
    None while the grid has not kept it. Caches of anything computed from a kept model key on
    this, so a model the grid replaces while the app serves (a new attempt, a superseded
    recipe) is read again, not served stale beside the new rows."""
    try:
        st = shipped_path(run).stat()
    except FileNotFoundError:
        return None
    return run.name, st.st_ino, st.st_mtime_ns, st.st_size


def load_shipped(arch: str, train_images: int, seed: int = 0,
                 variant: str = "original") -> nn.Module:
    """A model the grid trained and kept (`grid.KEEP_MODELS`), in eval mode; cached for as
    long as its file stays the same (`shipped_version`).

    Raises:
        FileNotFoundError: the grid did not keep this run.
    """
    run = LabRun(arch, train_images, seed, variant=variant)
    version = shipped_version(run)
    if version is None:
        raise FileNotFoundError(f"The grid kept no model for {run.name}.")

    def build_it() -> nn.Module:
        model = build(run.spec)
        model.load_state_dict(load_file(shipped_path(run)))
        return model.eval()

    return _SHIPPED.get_or_build(version, build_it)


def save_vit(model: nn.Module, run: LabRun, out_dir: str | os.PathLike, record: dict) -> Path:
    """Write a lab ViT in timm's layout into ``out_dir`` (atomic): then
    ``timm.create_model(f"local-dir:{out_dir}", pretrained=True)`` rebuilds it (after
    ``import explorer.lab.models``, which registers ``lab_vit``/``lab_vit_rel``)."""
    if run.arch not in VIT_ARCHS:
        raise ValueError(f"Only the ViTs ({', '.join(VIT_ARCHS)}) open in the other tabs.")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_for_hf(model, str(tmp), safe_serialization=True,
                model_config={"label_names": list(FASHION_MNIST_CLASSES), "lab_run": record,
                              "timm_version": timm.__version__},
                model_args={"embed_dim": run.width, "depth": run.depth})
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
