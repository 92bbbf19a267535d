"""The atomic image cache: concurrent writers of the same picture never expose a partial file."""

from __future__ import annotations

import threading

import numpy as np
from gradio import processing_utils
from PIL import Image

from explorer.ui import gradio_fixes


def test_concurrent_saves_of_one_image_never_read_short(tmp_path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), np.uint8))
    expected = processing_utils.encode_pil_to_bytes(img, "png")
    path = gradio_fixes.save_pil_to_cache_atomically(img, str(tmp_path), format="png")
    short_reads = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            with open(path, "rb") as f:
                if len(f.read()) != len(expected):
                    short_reads.append(1)

    def writer():
        for _ in range(30):
            assert gradio_fixes.save_pil_to_cache_atomically(img, str(tmp_path), format="png") == path

    threads = [threading.Thread(target=reader)] + [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()
    assert not short_reads
    assert open(path, "rb").read() == expected
    assert not list(tmp_path.rglob("*.part"))


def test_apply_replaces_gradios_function():
    gradio_fixes.apply()
    assert processing_utils.save_pil_to_cache is gradio_fixes.save_pil_to_cache_atomically
