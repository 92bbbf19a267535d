"""Opening uploads: every PIL mode, orientation, and each kind of bad file."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from explorer import images

CONFIG = {"input_size": (3, 224, 224), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.5)}


def _png_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=kwargs.pop("format", "PNG"), **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1", "RGB"])
def test_every_mode_becomes_rgb(mode):
    img = Image.new("RGB", (40, 30), (200, 100, 50)).convert(mode if mode not in ("I;16", "I", "F")
                                                               else "L")
    if mode in ("I;16", "I", "F"):
        ramp = np.tile(np.linspace(0, 60000 if mode != "F" else 1.0, 40), (30, 1))
        img = Image.fromarray(ramp.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
        assert img.mode == mode
    loaded = images.load_image(img)
    assert loaded.image.mode == "RGB" and loaded.image.size == (40, 30)
    if mode not in ("I;16", "I", "F"):  # opaque 8-bit modes: PIL's own RGB, pixel for pixel
        assert np.array_equal(np.asarray(loaded.image), np.asarray(img.convert("RGB")))
    if mode in ("I;16", "I", "F"):  # range stretched: a 16-bit ramp is not an all-white image
        gray = np.asarray(loaded.image)[..., 0]
        assert gray[:, 0].max() == 0 and gray[:, -1].min() == 255
        assert loaded.notes


def test_16_bit_png_file_is_stretched():
    ramp = np.tile(np.linspace(1000, 4000, 64).astype(np.uint16), (16, 1))
    loaded = images.load_image(_png_bytes(Image.fromarray(ramp)))
    gray = np.asarray(loaded.image)[..., 0]
    assert gray.min() == 0 and gray.max() == 255


def test_cmyk_jpeg_and_transparency():
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    rgb = np.asarray(images.load_image(_png_bytes(cmyk, format="JPEG")).image).astype(int)
    assert rgb[..., 0].mean() > 200 and rgb[..., 1].mean() < 60
    clear = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    assert np.asarray(images.load_image(clear).image).min() == 255  # shown on white


def test_exif_orientation_applied():
    img = Image.new("RGB", (60, 20), (10, 20, 30))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = _png_bytes(img, format="JPEG", exif=exif.tobytes())
    assert images.load_image(data).image.size == (20, 60)


def test_not_an_image():
    with pytest.raises(images.ImageError, match="not an image"):
        images.load_image(b"hello, this is a text file")


def test_truncated_file():
    data = _png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)),
                      format="JPEG")
    with pytest.raises(images.ImageError, match="truncated|corrupt|read"):
        images.load_image(data[: len(data) // 2])


def test_one_pixel():
    with pytest.raises(images.ImageError, match="1x1"):
        images.load_image(Image.new("RGB", (1, 1)))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height; PIL reads the header without decoding."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + \
        chunk(b"IEND", b"")


def test_decompression_bomb_refused_before_decoding():
    with pytest.raises(images.ImageError, match="too many pixels|pixels; the limit"):
        images.load_image(_png_header_only(20000, 20000))


def test_animated_gif_uses_first_frame_and_says_so():
    frames = [Image.new("RGB", (24, 24), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    loaded = images.load_image(buf.getvalue())
    assert np.asarray(loaded.image)[..., 0].mean() > 200  # red: the first frame
    assert any("Animated" in note for note in loaded.notes)


def test_large_images_are_downscaled():
    loaded = images.load_image(Image.new("RGB", (5000, 1000)), max_side=1000)
    assert loaded.image.size == (1000, 200) and loaded.notes


def test_prepare_pixels_non_square_and_round_trip():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 451, 3), np.uint8))
    pixels = images.prepare_pixels(img, CONFIG, size=(224, 336))
    assert pixels.shape == (1, 3, 224, 336) and pixels.dtype == torch.float32
    back = images.pixels_to_image(pixels, CONFIG)
    expected = np.asarray(images.fit_image(img, (224, 336)))
    assert back.shape == (224, 336, 3)
    assert np.abs(back.astype(int) - expected.astype(int)).max() <= 1
    # normalisation uses the weights' own mean/std: a pixel of value mean*255 maps to ~0
    grey = Image.new("RGB", (32, 32), tuple(int(m * 255 + 0.5) for m in CONFIG["mean"]))
    assert images.prepare_pixels(grey, CONFIG, (28, 28)).abs().max() < 0.02


def test_size_checks():
    assert images.snap_to_patch(230, 14) == 224 and images.snap_to_patch(3, 14) == 14
    images.check_size((224, 336), (14, 14))
    with pytest.raises(images.ImageError, match="multiple"):
        images.check_size((225, 336), (14, 14))
    with pytest.raises(images.ImageError, match="tokens"):
        images.check_size((14 * 100, 14 * 100), (14, 14))


def test_examples_are_the_bundled_image_files_in_name_order(tmp_path, monkeypatch):
    names = [p.name for p in images.example_paths()]
    assert names == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]  # not LICENSE.md
    # Any image suffix counts, links and other files do not; the UI and distance use this list.
    for name in ("b.png", "a.JPEG", "notes.txt"):
        (tmp_path / name).write_bytes(_png_bytes(Image.new("RGB", (8, 8))))
    (tmp_path / "c.png").symlink_to(tmp_path / "b.png")
    monkeypatch.setattr(images, "EXAMPLES_DIR", tmp_path)
    assert [p.name for p in images.example_paths()] == ["a.JPEG", "b.png"]
    from explorer import distance
    from explorer.ui import common

    assert common.example_images() == [str(tmp_path / "a.JPEG"), str(tmp_path / "b.png")]
    assert [im.size for im in distance.example_images()] == [(8, 8), (8, 8)]
