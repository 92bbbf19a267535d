"""The running app through `gradio_client`: bad uploads get clear messages, serving goes on."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

import app


@pytest.fixture(scope="module")
def client():
    demo = app.build_demo()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    yield Client(demo.local_url, verbose=False)
    demo.close()


def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def _encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def tokens(client, path, width=224, height=224):
    return client.predict(handle_file(path), None, width, height, "crop", api_name="/tokens")


def test_bad_uploads_each_get_a_clear_message_and_serving_continues(client, tmp_path):
    photo = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    jpeg = _encoded(Image.fromarray(photo), "JPEG")
    bad = {
        "not-an-image.png": (b"just some text, not pixels", "not an image"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated or corrupt"),
        "one-pixel.png": (_encoded(Image.new("RGB", (1, 1)), "PNG"), "1x1"),
        "huge.png": (_png_header_only(20000, 20000), "too many pixels|limit is"),
    }
    for name, (data, message) in bad.items():
        with pytest.raises(Exception, match=message):
            tokens(client, _write(tmp_path / name, data))
    # the same server still answers a good request
    summary = tokens(client, "assets/examples/rocket.jpg")[0]
    assert "16x16" in summary


def test_unusual_but_valid_uploads_work(client, tmp_path):
    ramp16 = np.tile(np.linspace(0, 65535, 96).astype(np.uint16), (64, 1))
    frames = [Image.new("RGB", (64, 64), c) for c in [(255, 0, 0), (0, 255, 0)]]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    ok = {
        "sixteen-bit.png": _encoded(Image.fromarray(ramp16), "PNG"),
        "cmyk.jpg": _encoded(Image.new("CMYK", (80, 60), (0, 128, 255, 0)), "JPEG"),
        "animated.gif": gif.getvalue(),
    }
    corners = {}
    for name, data in ok.items():
        summary, grid_file = tokens(client, _write(tmp_path / name, data), width=336, height=224)[:2]
        assert "24x16" in summary, name
        grid = np.asarray(Image.open(grid_file).convert("RGB"))  # the picture as decoded
        zoom = grid.shape[1] // 336
        assert grid.shape[:2] == (224 * zoom, 336 * zoom), name
        cell = 14 * zoom  # each patch's corner, inside the grid lines, away from its index
        corners[name] = grid[3:224 * zoom:cell, 3:336 * zoom:cell].astype(int)  # (16, 24, 3)
    ramp = corners["sixteen-bit.png"][..., 0].mean(axis=0)  # a dark-to-bright 16-bit ramp
    assert (np.diff(ramp) > 0).all() and ramp[0] < 30 and ramp[-1] > 225
    assert np.abs(corners["cmyk.jpg"] - (255, 127, 0)).max() < 12  # CMYK ink -> orange RGB
    assert np.abs(corners["animated.gif"] - (255, 0, 0)).max() < 12  # the first frame


def test_offline_hub_model_is_a_clear_message(client, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(Exception, match="need internet|no model called"):
        client.predict(handle_file("assets/examples/rocket.jpg"), "deit_tiny_patch16_224.fb_in1k",
                       224, 224, "crop", api_name="/tokens")


def test_attention_checks_its_inputs_first_and_still_explains_a_bad_file(client, tmp_path):
    # /attention has a validator (explorer.ui.common.validator): a missing image is refused
    # before the analysis, and a broken file still reaches the callback's own message
    def attention(image):
        return client.predict(image, None, 224, 224, "crop", 12, "mean", "mean", 0.0, 1, 0.6,
                              0.6, "inferno", "mean", api_name="/attention")

    with pytest.raises(Exception, match="Please upload an image"):
        attention(None)
    for name, data, message in [("not-an-image.png", b"just some text", "not an image"),
                                ("huge.png", _png_header_only(20000, 20000), "too many pixels|limit is")]:
        with pytest.raises(Exception, match=message):
            attention(handle_file(_write(tmp_path / name, data)))
