"""What an iGPT knows, in words for beside its upload: its image size and palette read from
the loaded model, and what it was trained on (display only; no gradio here).

A model completes what it has seen: the offline model was trained only on Fashion-MNIST's
28×28 grey garments, so any photo becomes a garment-like texture. Saying so next to the
upload, with the photo as the model receives it (`model_view`), keeps that from surprising.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from explorer.igpt.checkpoint import CATALOGUE, LoadedIGPT
from explorer.igpt.data import CLASS_NAMES
from explorer.igpt.pipeline import image_tokens
from explorer.igpt.plots import tokens_to_image

# What `explorer.igpt.train` (the trainer that writes train_config.json beside a checkpoint)
# reads: `explorer.igpt.data.load_fashion_mnist`, all 60,000 training images.
TRAINER_DATA = (f"Fashion-MNIST only: 60,000 grey photos of clothing in "
                f"{len(CLASS_NAMES)} classes ({', '.join(CLASS_NAMES)})")
OPENAI_DATA = "ImageNet (OpenAI's iGPT paper), downsampled to 32×32"


@dataclass(frozen=True)
class Domain:
    """The images a model was made for.

    Attributes:
        height, width: the image size it reads, in pixels (one token each).
        colours: the palette's size; grey: whether every palette colour is a grey.
        levels: the palette's grey levels (0-255) when grey, else empty.
        trained_on: its training data in words ("" when unknown).
    """

    height: int
    width: int
    colours: int
    grey: bool
    levels: tuple[int, ...]
    trained_on: str


def training_data(location: str | Path | None, name: str = "") -> str:
    """A model's training data in words: the trainer's (Fashion-MNIST) for a checkpoint that
    `explorer.igpt.train` wrote (it leaves train_config.json), OpenAI's for their hub
    models, else "" (unknown)."""
    if location is not None and (Path(location) / "train_config.json").is_file():
        return TRAINER_DATA
    if str(name).startswith("openai/imagegpt"):
        return OPENAI_DATA
    return ""


def model_domain(m: LoadedIGPT) -> Domain:
    """The `Domain` of a loaded model: size and palette from the model itself."""
    spec = CATALOGUE.get(m.name)
    location = spec.location if spec is not None and spec.source == "local" else (
        m.name if Path(m.name).is_dir() else None)
    grey = m.palette.is_grey
    levels = tuple(int(c[0]) for c in m.palette.colors.tolist()) if grey else ()
    return Domain(m.height, m.width, m.palette.size, grey, levels, training_data(location, m.name))


def domain_note(d: Domain) -> str:
    """The domain in words (Markdown), for beside the upload."""
    palette = (f"**{d.colours} grey levels** ({', '.join(map(str, d.levels))}): it never sees "
               "colour" if d.grey else f"**{d.colours} colours** (k-means clusters of RGB)")
    trained = (f" Trained on **{d.trained_on}**: it completes every picture as something "
               "from that world, so a photo of anything else comes back as texture in that "
               "style." if d.trained_on else " Its training data is not recorded with it.")
    return (f"**What this model sees:** {d.height}×{d.width} pixels ({d.height * d.width} "
            f"tokens), {palette}.{trained} Any upload is cropped and shrunk to "
            f"{d.height}×{d.width} and mapped to this palette, as shown beside it.")


def model_view(image: Image.Image, m: LoadedIGPT, target: int = 224) -> Image.Image:
    """``image`` as ``m`` receives it: cropped and shrunk to its size, in its palette, then
    blown up (nearest) to about ``target`` px so each pixel is a visible square."""
    _, tokens = image_tokens(image, m)
    scale = max(1, target // max(m.height, m.width))
    return tokens_to_image(tokens, m.palette, scale)
