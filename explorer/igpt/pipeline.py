"""From a picture to iGPT tokens, completions and surprise: the analyses the tab shows.

Pure functions over PIL images and tensors; `LoadedIGPT` carries the model, its palette and
its image size, so nothing here assumes 28×28 or a palette.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from explorer.igpt import batch
from explorer.igpt.checkpoint import LoadedIGPT
from explorer.igpt.likelihood import bits_per_dim, pixel_nll_bits
from explorer.igpt.palette import rgb9_dequantize, rgb9_quantize
from explorer.igpt.sampler import SampleConfig
from explorer.igpt.sequence import prefix_len, raster, unraster


def to_model_pixels(image: Image.Image, height: int, width: int) -> np.ndarray:
    """Centre-crop to the model's aspect ratio and downsample (box filter) to (H, W, 3) uint8."""
    small = ImageOps.fit(image.convert("RGB"), (width, height), method=Image.BOX)
    return np.asarray(small)


def image_tokens(image: Image.Image, m: LoadedIGPT) -> tuple[np.ndarray, torch.Tensor]:
    """-> (downsampled RGB (H, W, 3) uint8, colour tokens (H, W) int64 in the model's palette)."""
    small = to_model_pixels(image, m.height, m.width)
    return small, m.palette.quantize(torch.from_numpy(small.copy()))


def in_rgb9(image: Image.Image, max_side: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The photo (downscaled to `max_side`) and the same photo in the lecture's 9-bit palette.

    Returns (original (h, w, 3) uint8, 9-bit version (h, w, 3) uint8).
    """
    img = image.convert("RGB")
    img.thumbnail((max_side, max_side), Image.BOX)
    arr = np.asarray(img)
    return arr, rgb9_dequantize(rgb9_quantize(torch.from_numpy(arr.copy()))).cpu().numpy()


@dataclass
class Surprise:
    """Per-pixel negative log-likelihood of a real image under the model."""

    bits: torch.Tensor  # (H, W) bits per pixel token
    bits_per_dim: float  # mean bits / channels per token (1 grey, 3 colour)
    uniform_bits: float  # log2(palette size): the cost without a model

    def sentence(self) -> str:
        return (
            f"The model would need **{self.bits_per_dim:.2f} bits per dimension** to store this "
            f"image losslessly (arithmetic coding with its predictions), against "
            f"{self.uniform_bits:.1f} bits per pixel for colours picked blindly from the "
            "palette. Bright pixels are the ones it did not see coming given everything above "
            "and to the left of them: usually edges and textures; flat background is nearly free."
        )


def surprise(m: LoadedIGPT, tokens: torch.Tensor) -> Surprise:
    """tokens: (H, W) -> Surprise with (H, W) bits."""
    bits = pixel_nll_bits(m.model, tokens[None])[0]
    return Surprise(bits, bits_per_dim(bits, m.channels), float(np.log2(m.palette.size)))


def stream_completions(m: LoadedIGPT, tokens: torch.Tensor, rows_kept: int, n: int,
                       cfg: SampleConfig) -> Iterator[tuple[int, torch.Tensor]]:
    """Complete the image below `rows_kept` rows, `n` samples at once, one row at a time.

    The samples join the model's one decode loop, shared with every other completion running
    in this process (`explorer.igpt.batch`); they equal `sampler.complete_stream`'s for the
    same settings and seed. Closing the generator cancels them.

    tokens: (H, W) real image. Yields (pixels filled so far in raster order, samples (n, H, W))
    each time a row is finished; the last yield is the finished grid.
    """
    H, W = tokens.shape
    if not 0 <= rows_kept < H:
        raise ValueError(f"rows to keep must be between 0 and {H - 1}")
    P, L = prefix_len(rows_kept, W), H * W
    for t, out in batch.stream(m.model, raster(tokens)[:P], n, L, cfg, every=W):
        yield t, unraster(out, H, W)
