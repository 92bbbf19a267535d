"""Native CPU kernels, compiled on first use, with a plain-PyTorch fallback.

Two kernels, built into one library (``explorer_kernels``):

- ``attend`` (``attend.cpp``): the attention forward that also yields its probabilities,
  fused per block of query rows. `attend_op()` returns it; the attention capture reaches it
  only through `explorer.attention.native`, and falls back to PyTorch ops
  (`explorer.attention.attend`), which give the same numbers more slowly.
- ``decode_step`` (``decode.cpp``): one ImageGPT decode step for the rows of many
  completions at once, each row's arithmetic independent of the others'. `decode_op()`
  returns it; `explorer.igpt.batch` falls back to the model's PyTorch step.

Both return None where the library cannot be built (no C++ compiler, or switched off with
``EXPLORER_NATIVE=0``). Shared vector helpers live in ``simd.h``.

The build uses ``torch.utils.cpp_extension`` (a C++ compiler and ninja), runs once and is
cached on disk per torch and Python version, source and CPU (``-march=native``) under
``$EXPLORER_KERNEL_CACHE`` (default ``~/.cache/vit-explorer/kernels``). The app starts it in
the background at launch (`build_in_background`), so the first request does not wait.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = [HERE / "attend.cpp", HERE / "decode.cpp"]
HEADERS = [HERE / "simd.h"]
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_state: dict[str, object] = {}  # "built" (bool) and "error" once tried


def enabled() -> bool:
    """False when switched off with ``EXPLORER_NATIVE=0`` (e.g. to compare with the fallback)."""
    return os.environ.get("EXPLORER_NATIVE", "1") != "0"


def compiler_available() -> bool:
    """Whether the C++ compiler `torch.utils.cpp_extension` would use (``$CXX``, else
    ``c++``) is on the PATH: without one the kernel cannot build."""
    return shutil.which(os.environ.get("CXX", "c++")) is not None


def _cpu_key() -> str:
    """The CPU's feature flags (``-march=native`` code is only valid on such a CPU)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.machine()


def build_directory() -> Path:
    """Where this torch + Python + sources + CPU combination is built."""
    key = hashlib.sha256()
    for part in (torch.__version__, sys.version, *(f.read_bytes() for f in SOURCES + HEADERS),
                 " ".join(CFLAGS), _cpu_key()):
        key.update(part if isinstance(part, bytes) else part.encode())
    root = Path(os.environ.get("EXPLORER_KERNEL_CACHE",
                               Path.home() / ".cache" / "vit-explorer" / "kernels"))
    return root / f"kernels-{key.hexdigest()[:16]}"


def _build() -> None:
    from torch.utils import cpp_extension

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="explorer_kernels", sources=[str(f) for f in SOURCES], extra_cflags=CFLAGS,
        extra_ldflags=LDFLAGS, extra_include_paths=[str(HERE)], build_directory=str(directory),
        is_python_module=False, verbose=False,
    )


def _built() -> bool:
    """Build the library (or load it from the disk cache) once; False if it cannot be."""
    if not enabled():
        return False
    if "built" in _state:
        return bool(_state["built"])
    with _lock:
        if "built" not in _state:
            try:
                _build()
                _state["built"] = True
            except Exception as exc:  # no compiler, no ninja, a build error: fall back
                _state["built"], _state["error"] = False, f"{type(exc).__name__}: {exc}"
                log.warning("Native kernels unavailable, using PyTorch ops: %s",
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return bool(_state["built"])


def attend_op() -> Callable | None:
    """The compiled ``attend`` op, building it the first time; None if it cannot be built.

    ``attend(q, k, v, probs, mean, block_rows) -> out``: q, k, v (B, H, N, d) float32 on
    CPU (q scaled, unit stride in d; k unit stride in d or N), probs (B, H, N, N) and mean
    (B, N, N) contiguous or None, out (B, N, H, d).
    """
    return torch.ops.explorer_kernels.attend if _built() else None


def decode_op() -> Callable | None:
    """The compiled ``decode_step`` op (layouts in ``decode.cpp``); None if it cannot be built.

    ``decode_step(tokens, weights, k_pre, v_pre, k_own, v_own, group_rows, group_pos, n_head,
    eps, n_out) -> (B, n_out) logits``; `explorer.igpt.batch.KernelStep` prepares its inputs.
    """
    return torch.ops.explorer_kernels.decode_step if _built() else None


def build_error() -> str | None:
    """Why the kernel could not be built, if it was tried and failed."""
    return _state.get("error")  # type: ignore[return-value]


def build_in_background() -> threading.Thread:
    """Start building (or loading from the disk cache) without blocking the caller."""
    thread = threading.Thread(target=_built, name="explorer-kernel-build", daemon=True)
    thread.start()
    return thread
