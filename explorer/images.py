"""Opening uploads safely and preparing them for a model at any resolution.

`load_image` is the one door for user images: it accepts a path, bytes, a file object, a
PIL image or an array, and returns an 8-bit RGB image or raises `ImageError` with a message
meant for a person. `prepare_pixels` turns that image into the normalised tensor a model
expects, at its native size or at any (height, width) multiple of the patch size.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "assets" / "examples"  # bundled photos
# File names read as images, wherever files are listed (folders, zips, the examples).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MAX_PIXELS = 40_000_000  # refuse to decode more (a 20000x20000 PNG is 400 MP: a "bomb")
MAX_SIDE = 2048  # larger images are downscaled right after decoding; no view needs more
MIN_SIDE = 8  # below this there is nothing to tokenise


class ImageError(ValueError):
    """An upload that cannot be used; ``str(err)`` is a message for the person who sent it."""


@dataclass
class LoadedImage:
    """An 8-bit RGB image and what was done to it on the way in.

    Attributes:
        image: PIL image, mode "RGB", EXIF orientation applied, sides <= `MAX_SIDE`.
        notes: human sentences about conversions (mode, animation, downscaling).
    """

    image: Image.Image
    notes: list[str] = field(default_factory=list)


def _open(src) -> Image.Image:
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, np.ndarray):
        return Image.fromarray(_array_to_uint8(src))
    if isinstance(src, bytes | bytearray):
        src = io.BytesIO(src)
    elif isinstance(src, str | os.PathLike):
        if not os.path.isfile(src):
            raise ImageError(f"No file at {os.fspath(src)!r}.")
    return Image.open(src)


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    array = array.astype(np.float64)
    lo, hi = np.nanmin(array), np.nanmax(array)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.nan_to_num((array - lo) * scale).clip(0, 255).astype(np.uint8)


def _to_rgb(img: Image.Image, notes: list[str]) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit / float: stretch the actual range to 0..255 (a plain convert("L")
        # clips 16-bit values and shows an almost white image).
        array = np.asarray(img, dtype=np.float64)
        notes.append(f"{mode} image: its value range was stretched to 8 bits.")
        return Image.fromarray(_array_to_uint8(array)).convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        notes.append("Transparent areas were shown on white.")
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "CMYK":
        notes.append("CMYK image converted to RGB.")
    return img.convert("RGB")


def load_image(src, max_side: int = MAX_SIDE) -> LoadedImage:
    """Open an upload safely as 8-bit RGB.

    Args:
        src: path, bytes, binary file object, PIL image, or (H, W[, C]) array.
        max_side: longer side after loading; bigger images are downscaled (Lanczos).

    Returns:
        `LoadedImage` with the RGB image and notes about what was converted.

    Raises:
        ImageError: not an image, truncated/corrupt, too small, or too many pixels to decode.
    """
    notes: list[str] = []
    try:
        img = _open(src)
    except UnidentifiedImageError as err:
        raise ImageError("This file is not an image PIL can read (try PNG, JPEG or WebP).") from err
    except Image.DecompressionBombError as err:
        raise ImageError(f"This image has too many pixels (limit {MAX_PIXELS:,}).") from err
    except OSError as err:
        raise ImageError(f"Could not read this file as an image ({err}).") from err

    width, height = img.size
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"This image is {width}x{height} = {width * height:,} pixels; the limit is "
            f"{MAX_PIXELS:,}. Please downscale it first."
        )
    if min(width, height) < MIN_SIDE:
        raise ImageError(
            f"This image is only {width}x{height} pixels; it needs at least {MIN_SIDE} "
            "pixels per side to be cut into patches."
        )
    if getattr(img, "is_animated", False):
        notes.append(f"Animated image with {img.n_frames} frames: using the first frame.")
        img.seek(0)
    try:
        if img.format == "JPEG" and max(width, height) > 2 * max_side:
            img.draft("RGB", (max_side, max_side))  # decode at reduced size: cheaper
        img.load()
        img = ImageOps.exif_transpose(img)
        rgb = _to_rgb(img, notes)
    except OSError as err:
        raise ImageError(f"The image file is truncated or corrupt ({err}).") from err

    if max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        notes.append(f"Downscaled from {rgb.width}x{rgb.height} to {size[0]}x{size[1]}.")
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    return LoadedImage(rgb.copy(), notes)


def open_image(src, max_side: int = MAX_SIDE) -> Image.Image:
    """`load_image` without the notes: an RGB PIL image, or `ImageError`."""
    return load_image(src, max_side=max_side).image


def example_paths() -> list[Path]:
    """The bundled example photos, sorted by name: the one list every tab and dataset uses.

    Licences are in assets/examples/LICENSE.md. Only regular image files count (no
    symlinks), so what ships in the folder is what is shown.
    """
    return sorted(p for p in EXAMPLES_DIR.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.is_symlink())


# Decompression-bomb guard for every PIL decode in this process, not only ours.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


# ---------------------------------------------------------------------------------------
# Model input
# ---------------------------------------------------------------------------------------


def snap_to_patch(size: int, patch: int) -> int:
    """The multiple of ``patch`` nearest to ``size`` (at least one patch)."""
    return max(patch, int(round(size / patch)) * patch)


def native_size(data_config: dict) -> tuple[int, int]:
    """(height, width) the weights were trained at, from timm's data config."""
    _, height, width = data_config["input_size"]
    return int(height), int(width)


def check_size(size: tuple[int, int], patch: tuple[int, int], max_tokens: int = 4096) -> None:
    """Raise `ImageError` unless ``size`` is a whole number of patches and not absurdly big."""
    (height, width), (ph, pw) = size, patch
    if height % ph or width % pw or height < ph or width < pw:
        raise ImageError(f"{width}x{height} is not a multiple of the {pw}x{ph} patch size.")
    if (height // ph) * (width // pw) > max_tokens:
        raise ImageError(f"{width}x{height} would make more than {max_tokens} patch tokens.")


def fit_image(image: Image.Image, size: tuple[int, int], fit: str = "crop") -> Image.Image:
    """Resize an RGB image to ``size`` = (height, width).

    ``fit="crop"`` scales the shorter side to cover and centre-crops (keeps the aspect ratio,
    like timm's eval transform with crop_pct=1); ``fit="stretch"`` resizes directly.
    """
    height, width = size
    if fit == "stretch":
        return image.resize((width, height), Image.Resampling.BICUBIC)
    return ImageOps.fit(image, (width, height), Image.Resampling.BICUBIC)


def prepare_pixels(
    image: Image.Image,
    data_config: dict,
    size: tuple[int, int] | None = None,
    fit: str = "crop",
) -> torch.Tensor:
    """Normalised model input for one image.

    Args:
        image: RGB PIL image (from `load_image`).
        data_config: timm data config (``mean``, ``std``, ``input_size``).
        size: (height, width) in pixels, multiples of the patch size; None = native size.
        fit: "crop" (keep aspect, centre crop) or "stretch".

    Returns:
        (1, 3, H, W) float32 tensor, normalised with the weights' mean and std.
    """
    size = size or native_size(data_config)
    resized = fit_image(image, size, fit)
    array = torch.from_numpy(np.array(resized, dtype=np.float32)).permute(2, 0, 1) / 255.0
    mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(data_config["std"], dtype=torch.float32).view(3, 1, 1)
    return ((array - mean) / std).unsqueeze(0)


def pixels_to_image(pixels: torch.Tensor, data_config: dict) -> np.ndarray:
    """Undo `prepare_pixels` for display.

    Args:
        pixels: (3, H, W) or (1, 3, H, W) normalised tensor.

    Returns:
        (H, W, 3) uint8 array.
    """
    pixels = pixels.detach().float().cpu().reshape(3, *pixels.shape[-2:])
    mean = torch.tensor(data_config["mean"]).view(3, 1, 1)
    std = torch.tensor(data_config["std"]).view(3, 1, 1)
    rgb = (pixels * std + mean).clamp(0, 1).permute(1, 2, 0)
    return (rgb * 255 + 0.5).to(torch.uint8).cpu().numpy()
