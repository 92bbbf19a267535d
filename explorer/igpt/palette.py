"""Colour palettes that turn pixels into tokens, and back.

Three kinds, all pure tensor functions:

- **9-bit RGB** (the lecture's "naive solution"): keep the top 3 bits of each channel,
  token = r3 * 64 + g3 * 8 + b3, 512 colours. Inverse: each 3-bit level i -> round(i * 255 / 7).
- **k-means clusters** (OpenAI's iGPT checkpoints): a (K, 3) table of centres in [-1, 1];
  a pixel maps to the nearest centre after x / 127.5 - 1, and a token back to
  rint(127.5 * (centre + 1)). This is what transformers' `ImageGPTImageProcessor` does.
- **grey levels** (our Fashion-MNIST model): K evenly spaced greys, written as a cluster
  palette whose centres lie on the grey diagonal, so transformers' image processor can read
  it too. With K = 8 the greys are exactly the 8 greys of the 9-bit palette (r = g = b).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

RGB9_BITS = 3  # bits kept per channel in the lecture's palette


@dataclass(frozen=True)
class Palette:
    """A colour table plus the rule that maps pixels onto it.

    kind: "rgb9" (top 3 bits per channel) or "clusters" (nearest centre; grey palettes too).
    centers: (K, 3) float in [-1, 1] for kind "clusters"; None for "rgb9".
    name: a label for the UI ("9-bit RGB", "8 grey levels", "OpenAI k-means 512").
    """

    kind: str
    centers: torch.Tensor | None
    name: str

    @property
    def size(self) -> int:
        return 2 ** (3 * RGB9_BITS) if self.kind == "rgb9" else int(self.centers.shape[0])

    @property
    def colors(self) -> torch.Tensor:
        """(K, 3) uint8: the RGB colour shown for each token."""
        return self.dequantize(torch.arange(self.size))

    @property
    def is_grey(self) -> bool:
        c = self.centers
        return c is not None and bool((c.amax(1) - c.amin(1)).abs().max() < 1e-6)

    def quantize(self, img: torch.Tensor) -> torch.Tensor:
        """img: (..., H, W, 3) or (..., H, W) uint8 -> tokens (..., H, W) int64."""
        img = _as_rgb(img)
        if self.kind == "rgb9":
            return rgb9_quantize(img)
        return cluster_quantize(img, self.centers)

    def dequantize(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (...) int -> (..., 3) uint8 RGB."""
        if self.kind == "rgb9":
            return rgb9_dequantize(tokens)
        return cluster_dequantize(tokens, self.centers)

    def to_json(self) -> dict:
        out = {"kind": self.kind, "name": self.name}
        if self.centers is not None:
            out["clusters"] = self.centers.tolist()
        return out

    @classmethod
    def from_json(cls, d: dict) -> Palette:
        centers = torch.tensor(d["clusters"], dtype=torch.float32) if "clusters" in d else None
        return cls(kind=d["kind"], centers=centers, name=d.get("name", d["kind"]))


def _as_rgb(img: torch.Tensor) -> torch.Tensor:
    """(..., H, W) grey or (..., H, W, 3) RGB uint8 -> (..., H, W, 3) uint8."""
    if img.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {img.dtype}")
    if img.shape[-1] == 3 and img.dim() >= 3:
        return img
    return img.unsqueeze(-1).expand(*img.shape, 3)


# ---- 9-bit RGB ---------------------------------------------------------------------------------

def rgb9_quantize(img: torch.Tensor) -> torch.Tensor:
    """(..., 3) uint8 RGB -> (...) int64 tokens in [0, 512): r3 * 64 + g3 * 8 + b3."""
    lv = (img >> (8 - RGB9_BITS)).long()  # (..., 3) levels 0..7
    return (lv[..., 0] << 2 * RGB9_BITS) | (lv[..., 1] << RGB9_BITS) | lv[..., 2]


def rgb9_dequantize(tokens: torch.Tensor) -> torch.Tensor:
    """(...) tokens in [0, 512) -> (..., 3) uint8, each 3-bit level i shown as round(i*255/7)."""
    t = tokens.long()
    mask = 2 ** RGB9_BITS - 1
    lv = torch.stack([(t >> 2 * RGB9_BITS) & mask, (t >> RGB9_BITS) & mask, t & mask], -1)
    return torch.round(lv.float() * 255 / mask).to(torch.uint8)


def rgb9_palette() -> Palette:
    return Palette(kind="rgb9", centers=None, name="9-bit RGB (3 bits per channel)")


# ---- k-means clusters (OpenAI) and grey levels -------------------------------------------------

def cluster_quantize(img: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """(..., 3) uint8 -> (...) int64: nearest centre in OpenAI's [-1, 1] colour space.

    centers: (K, 3) float. Same rule as transformers' `ImageGPTImageProcessor.color_quantize`.
    """
    x = img.float() / 127.5 - 1.0  # (..., 3)
    flat = x.reshape(-1, 3)
    # squared distance without the |x|^2 term, which is the same for every centre
    d = (centers * centers).sum(1) - 2 * flat @ centers.T  # (N, K)
    return d.argmin(1).reshape(x.shape[:-1])


def cluster_dequantize(tokens: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """(...) tokens -> (..., 3) uint8: rint(127.5 * (centre + 1))."""
    rgb = torch.round(127.5 * (centers[tokens.long()] + 1.0))
    return rgb.clamp(0, 255).to(torch.uint8)


def cluster_palette(centers, name: str = "k-means clusters") -> Palette:
    """From a (K, 3) table in [-1, 1] (e.g. `ImageGPTImageProcessor.clusters`)."""
    return Palette(kind="clusters", centers=torch.as_tensor(centers, dtype=torch.float32),
                   name=name)


def grey_palette(levels: int = 8) -> Palette:
    """`levels` evenly spaced greys, 0 .. 255, as a cluster palette on the grey diagonal.

    Grey level i is shown as round(i * 255 / (levels - 1)); a pixel v maps to the nearest
    level, round(v * (levels - 1) / 255).
    """
    if not 2 <= levels <= 256:
        raise ValueError(f"levels must be in [2, 256], got {levels}")
    g = torch.round(torch.arange(levels) * 255 / (levels - 1)) / 127.5 - 1.0  # (K,)
    return Palette(kind="clusters", centers=g[:, None].expand(levels, 3).contiguous(),
                   name=f"{levels} grey levels")


def grey_quantize(img: torch.Tensor, levels: int) -> torch.Tensor:
    """Fast path for grey images: (..., H, W) uint8 -> nearest of `levels` evenly spaced greys.

    Equals `grey_palette(levels).quantize(img)` (a 256-entry lookup table built from it, so
    ties between two greys resolve the same way); used on whole data sets.
    """
    lut = grey_palette(levels).quantize(torch.arange(256, dtype=torch.uint8)[None])[0]  # (256,)
    return lut[img.long()]


# ---- files -------------------------------------------------------------------------------------

def save_palette(palette: Palette, path: str | Path) -> None:
    Path(path).write_text(json.dumps(palette.to_json()))


def load_palette(path: str | Path) -> Palette:
    return Palette.from_json(json.loads(Path(path).read_text()))
