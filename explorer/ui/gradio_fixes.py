"""Work-arounds for Gradio behaviour that breaks a many-user demo. Applied by `app.build_demo`.

Gradio 6.31's ``processing_utils.save_pil_to_cache`` names each output image by the hash of
its bytes and rewrites the file with ``write_bytes`` every time. When two people get the
same picture at once (a lecture hall clicking the same example), one request truncates the
file while the other's client downloads it: the client receives 0 bytes ("peer closed
connection without sending complete message body"; 3 of 40 requests in our 8-client load
test). Gradio's own ``save_file_to_cache`` already writes under a temporary name and renames;
this gives images the same treatment.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from gradio import processing_utils
from PIL import Image


def save_pil_to_cache_atomically(
    img: Image.Image, cache_dir: str, name: str = "image", format: str = "webp"
) -> str:
    """Drop-in for ``processing_utils.save_pil_to_cache`` that never exposes a partial file."""
    data = processing_utils.encode_pil_to_bytes(img, format)
    folder = Path(cache_dir) / processing_utils.hash_bytes(data)
    folder.mkdir(exist_ok=True, parents=True)
    path = (folder / f"{name}.{format}").resolve()
    if not path.exists():  # same hash, same bytes: an existing file is already right
        partial = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.part")
        partial.write_bytes(data)
        os.replace(partial, path)  # atomic on POSIX: readers see no file or the whole file
    return str(path)


def apply() -> None:
    """Install the fixes (idempotent)."""
    processing_utils.save_pil_to_cache = save_pil_to_cache_atomically
