"""Text drawn into images: one real font (DejaVu Sans) and captions that fit their cell.

Pillow's own default font has no arrows or multiplication signs ("Coat → Trouser" drew as
"Coat ▯ Trouser"), so every label drawn into a picture uses DejaVu Sans: the copy matplotlib
ships (matplotlib is a requirement), else the Debian package's (fonts-dejavu-core), and only if
neither exists Pillow's default. Nothing is downloaded.

`fit_caption` picks a size and line breaks so a caption stays inside a width, and
`missing_glyphs` says which characters a font cannot draw; the tests use both to fail on a
box glyph or an overflowing caption.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import ImageFont

DEBIAN_DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
ELLIPSIS = "…"
_PRIVATE_USE = "\ue000"  # no font maps it: it draws as the font's missing-glyph box


@functools.cache
def font_path() -> Path | None:
    """DejaVu Sans: matplotlib's bundled copy, else Debian's; None when neither is here."""
    candidates = []
    try:
        import matplotlib

        candidates.append(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")
    except ImportError:  # matplotlib is a requirement, but text must not depend on it
        pass
    candidates.append(DEBIAN_DEJAVU)
    return next((p for p in candidates if os.path.isfile(p)), None)


@functools.lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans at ``size`` px (`font_path`), else Pillow's default font at that size."""
    path = font_path()
    if path is not None:
        return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)


def missing_glyphs(text: str, typeface=None) -> set[str]:
    """The characters of ``text`` that ``typeface`` (default: `font` (14)) draws as its
    missing-glyph box: their bitmap is the one a private-use code point gets."""
    typeface = typeface or font(14)
    box = bytes(typeface.getmask(_PRIVATE_USE))
    return {ch for ch in set(text) if not ch.isspace() and bytes(typeface.getmask(ch)) == box}


def text_width(text: str, typeface) -> float:
    """Width in px of ``text`` drawn in ``typeface`` (its advance, as `ImageDraw.textlength`)."""
    return typeface.getlength(text)


def line_height(typeface) -> int:
    """Height in px of one line of ``typeface`` (ascent + descent)."""
    ascent, descent = typeface.getmetrics()
    return ascent + descent


@dataclass(frozen=True)
class Caption:
    """A caption laid out for a width: its size and its lines (each at most that wide).

    Attributes:
        size: font size in px.
        lines: the text broken at spaces (a word too long for the width is cut with "…").
    """

    size: int
    lines: tuple[str, ...]

    @property
    def font(self):
        return font(self.size)

    @property
    def height(self) -> int:
        return len(self.lines) * line_height(self.font)


def _greedy(text: str, width: float, typeface) -> list[str]:
    """``text`` broken at spaces into lines of at most ``width`` px (a single word wider
    than that keeps a line to itself)."""
    lines: list[str] = []
    for word in text.split(" "):
        joined = f"{lines[-1]} {word}" if lines else word
        if lines and text_width(joined, typeface) <= width:
            lines[-1] = joined
        else:
            lines.append(word)
    return lines


def _cut(line: str, width: float, typeface) -> str:
    """``line`` shortened, with an ellipsis, until it is at most ``width`` px wide."""
    while line and text_width(line + ELLIPSIS, typeface) > width:
        line = line[:-1]
    return line.rstrip() + ELLIPSIS


def fit_caption(text: str, width: float, size: int, min_size: int = 9,
                max_lines: int = 2) -> Caption:
    """The largest size from ``size`` down to ``min_size`` at which ``text`` fits ``width``
    px in at most ``max_lines`` lines (broken at spaces); at ``min_size``, cut to fit with an
    ellipsis."""
    for s in range(size, min_size - 1, -1):
        lines = _greedy(text, width, font(s))
        if len(lines) <= max_lines and all(text_width(x, font(s)) <= width for x in lines):
            return Caption(s, tuple(lines))
    typeface = font(min_size)
    lines = _greedy(text, width, typeface)
    kept = lines[:max_lines]
    if len(lines) > max_lines:
        kept[-1] = _cut(kept[-1], width, typeface)
    return Caption(min_size, tuple(x if text_width(x, typeface) <= width else
                                   _cut(x, width, typeface) for x in kept))


def fit_captions(texts: Sequence[str], width: float, size: int, min_size: int = 9,
                 max_lines: int = 2) -> list[Caption]:
    """`fit_caption` for captions shown side by side: one common size (the smallest any of
    them needs), so neighbours read alike."""
    common = min((fit_caption(t, width, size, min_size, max_lines).size for t in texts),
                 default=size)
    return [fit_caption(t, width, common, min_size, max_lines) for t in texts]


def fit_size(text: str, width: float, height: float, size: int, min_size: int = 6) -> int:
    """The largest size from ``size`` down to ``min_size`` at which ``text`` fits one line of
    ``width`` x ``height`` px (e.g. a token index inside its patch)."""
    for s in range(size, min_size - 1, -1):
        left, top, right, bottom = font(s).getbbox(text)
        if right - left <= width and bottom - top <= height:
            return s
    return min_size
