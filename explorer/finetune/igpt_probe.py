"""Layer-wise linear probe of the iGPT trained here (`explorer.igpt`), as in iGPT's Figure 3.

Following Chen et al. (2020)'s linear probes: the features of layer ``l`` are its hidden
states after layer norm, average-pooled over the sequence; the model reads the whole image
(start token + all pixels but the last, the input it was trained on).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

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
