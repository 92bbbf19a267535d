"""Layer-wise linear probe of the iGPT trained here (`explorer.igpt`), as in iGPT's Figure 3.

Following Chen et al. (2020)'s linear probes: the features of layer ``l`` are its hidden
states after layer norm, average-pooled over the sequence; the model reads the whole image
(start token + all pixels but the last, the input it was trained on).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from explorer.datasets import ImageSet
from explorer.finetune.probe import LayerwiseProbe, layerwise_probe


def igpt_tokens(images: ImageSet, indices: np.ndarray, palette, height: int, width: int
                ) -> torch.Tensor:
    """(B, H, W) palette tokens of the chosen images, resized to the model's size."""
    grey = palette.is_grey
    arrays = []
    for i in indices:
        image = images.image(int(i)).resize((width, height), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image.convert("L") if grey else image))
    return palette.quantize(torch.from_numpy(np.stack(arrays)))


@torch.no_grad()
def igpt_layer_features(model, tokens: torch.Tensor) -> torch.Tensor:
    """Per-layer pooled features.

    Args:
        model: `explorer.igpt.model.ImageGPT`.
        tokens: (B, H, W) palette tokens.

    Returns:
        (B, n_layer, n_embd): ``ln_f`` of each block's output, mean over positions.
    """
    from explorer.igpt.sequence import model_inputs

    inputs, _ = model_inputs(tokens, model.config.start_token)  # (B, H*W)
    captured: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: captured.append(out))
             for block in model.transformer.h]
    try:
        model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    if len(captured) != len(model.transformer.h):
        raise RuntimeError(f"captured {len(captured)} of {len(model.transformer.h)} layers")
    ln_f = model.transformer.ln_f
    return torch.stack([ln_f(h).mean(1) for h in captured], 1)


def igpt_layerwise(loaded, train_set: ImageSet, val_set: ImageSet, batch_size: int = 64,
                   cancel: threading.Event | None = None, steps: int = 300
                   ) -> Iterator[tuple[str, int, LayerwiseProbe | None]]:
    """`layerwise_probe` for a loaded iGPT (`explorer.igpt.checkpoint.LoadedIGPT`)."""
    model = loaded.model.eval()

    def batches(images: ImageSet):
        for start in range(0, len(images), batch_size):
            index = np.arange(start, min(start + batch_size, len(images)))
            tokens = igpt_tokens(images, index, loaded.palette, loaded.height, loaded.width)
            yield tokens, torch.as_tensor(images.labels[index])

    yield from layerwise_probe(lambda t: igpt_layer_features(model, t), batches(train_set),
                               batches(val_set), len(train_set.classes), loaded.name, cancel,
                               steps)


def load_offline_igpt(directory: str | None = None):
    """The Fashion-MNIST iGPT trained here (or the checkpoint in ``directory``), or None while
    it does not exist."""
    try:
        from explorer.igpt.checkpoint import OFFLINE_NAME, ModelUnavailableError, load_igpt
    except ImportError:
        return None
    try:
        return load_igpt(directory or OFFLINE_NAME)
    except (ModelUnavailableError, FileNotFoundError):
        return None


def igpt_layerwise_probe(train_set: ImageSet, val_set: ImageSet, directory: str | None = None
                         ) -> LayerwiseProbe | None:
    """Probe vs depth for the offline iGPT (or ``directory``); None when it is not there."""
    loaded = load_offline_igpt(directory)
    if loaded is None:
        return None
    *_, (_, _, probe) = igpt_layerwise(loaded, train_set, val_set)
    return probe


# ---- the shipped result (assets/igpt/probe.json), shown in the iGPT tab ----------------------

def probe_asset_path() -> Path:
    from explorer.igpt.checkpoint import ASSET_DIR

    return ASSET_DIR / "probe.json"


def probes_from_bench(bench: dict) -> list[LayerwiseProbe]:
    """The iGPT and DINOv2 curves of one `python -m explorer.bench finetune --json` result
    (its "layerwise_igpt" and "layerwise" parts, which share one train/test split)."""
    out = []
    for key, name in (("layerwise_igpt", "iGPT (offline, Fashion-MNIST)"),
                      ("layerwise", "DINOv2 ViT-S/14")):
        part = bench.get(key)
        if isinstance(part, dict):
            out.append(LayerwiseProbe(part["depths"], part["train_acc"], part["val_acc"],
                                      f"{name}, {len(part['depths'])} blocks"))
    return out


def load_probe_asset(path: str | Path | None = None) -> tuple[list[LayerwiseProbe], dict]:
    """(probes, split/command metadata) from the shipped JSON; ([], {}) when it is missing."""
    path = Path(path) if path is not None else probe_asset_path()
    if not path.exists():
        return [], {}
    data = json.loads(path.read_text())
    probes = [LayerwiseProbe(p["depths"], p["train_acc"], p["val_acc"], p["model_name"])
              for p in data["probes"]]
    return probes, {k: v for k, v in data.items() if k != "probes"}


def middle_layer_peak(probe: LayerwiseProbe, margin: float = 0.005) -> bool:
    """Whether the best block is before the last and beats the last by more than ``margin``
    (iGPT's finding: linear-probe accuracy peaks in the middle of the network, then falls)."""
    best = probe.val_acc[probe.depths.index(probe.best_depth)]
    return probe.best_depth < probe.depths[-1] and best - probe.val_acc[-1] > margin


def probe_summary(probe: LayerwiseProbe) -> str:
    """One sentence: where the probe peaks and what the last block gives."""
    best = probe.val_acc[probe.depths.index(probe.best_depth)]
    where = (f"peaks at block {probe.best_depth} of {len(probe.depths)} ({best:.1%}), "
             f"the last block gives {probe.val_acc[-1]:.1%}")
    if middle_layer_peak(probe):
        return f"{probe.model_name}: {where}: the best features are inside the network."
    return f"{probe.model_name}: {where}: no middle-layer peak."


def probe_asset(bench: dict, command: str) -> dict:
    """The JSON shipped as assets/igpt/probe.json, from a finetune-bench result."""
    igpt, dino = bench["layerwise_igpt"], bench["layerwise"]
    return {
        "split": (f"{dino['train_images']:,} training images for the probe, "
                  f"{dino['test_images']:,} official test images to score it (stratified, "
                  f"seed 2); iGPT at 28×28 in its 8 greys, DINOv2 at "
                  f"{dino['resolution'][0]} px"),
        "command": command, "date_utc": bench.get("date_utc"), "machine": bench.get("machine"),
        "n_train": dino["train_images"], "n_test": dino["test_images"],
        "igpt_checkpoint_step": igpt.get("checkpoint_step"),
        "wall_s": {"igpt": igpt.get("wall_s"), "dinov2": dino.get("wall_s")},
        "probes": [dataclasses.asdict(p) for p in probes_from_bench(bench)],
    }


if __name__ == "__main__":  # python -m explorer.finetune.igpt_probe BENCH.json [OUT.json]
    import sys

    bench_path = sys.argv[1]
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else probe_asset_path()
    bench = json.loads(Path(bench_path).read_text())
    command = ("python -m explorer.bench finetune --skip probe,tp --threads 1 --layer-train "
               f"{bench['layerwise']['train_images']} --layer-test "
               f"{bench['layerwise']['test_images']} --json {bench_path}; "
               f"python -m explorer.finetune.igpt_probe {bench_path}")
    out.write_text(json.dumps(probe_asset(bench, command), indent=1) + "\n")
    print(f"wrote {out}")
