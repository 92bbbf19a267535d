"""Process tuning for serving many requests on a few CPU cores: torch threads, the GIL's
hand-over interval, glibc's malloc arenas and a thread that trims the heap; and, for a
process that only trains (a lab grid worker, a live run's trainer), the opposite heap
policy: keep what it frees.

`tune` applies all of it from the settings (`explorer.settings.Settings`) before the app
serves; each step is a function of its own value, so tests and benchmarks call them alone.
What each bought is measured in BENCHMARKS.md, "Serving a lecture hall".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
import time
from collections.abc import Callable

from explorer.settings import Settings

# glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -2, -3, -8
# the largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
MAX_MMAP_THRESHOLD = 32 << 20


def tune(settings: Settings) -> None:
    """Everything below, from ``settings``; call before the first request thread allocates."""
    cap_malloc_arenas(settings.malloc_arenas)
    trim_memory_every(settings.malloc_trim_s)
    set_threads(settings.torch_threads or threads_per_request(settings.concurrency),
                settings.gil_switch_ms)


def threads_per_request(concurrency: int, cores: int | None = None) -> int:
    """The CPU cores split between the requests that may run at once (at least one each).

    Gradio runs up to ``concurrency`` analyses in parallel threads; if each used every core
    they would fight over them, so each gets its share. The lab grid shares them the same way
    between its ``concurrency`` worker processes.
    """
    return max(1, (cores or os.cpu_count() or 1) // max(1, concurrency))


def set_threads(torch_threads: int, gil_switch_ms: float) -> None:
    """Torch's threads per request, and how often the GIL changes hands.

    Every PyTorch call releases the GIL and takes it back when done; while another request
    thread runs Python (plots, gradio) it waits up to the switch interval for it. The iGPT
    sampler makes many short calls per pixel, so it waits most: a shorter interval than
    Python's 5 ms lets them through.
    """
    import torch

    torch.set_num_threads(torch_threads)
    sys.setswitchinterval(gil_switch_ms / 1000)


def glibc_function(name: str) -> Callable | None:
    """The C library's function ``name`` (``mallopt``, ``malloc_trim``), or None where the C
    library is not glibc (musl, macOS) and lacks it."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def cap_malloc_arenas(arenas: int | None) -> int | None:
    """Cap glibc's malloc arenas at ``arenas`` (None: leave glibc's choice).

    glibc gives each thread that allocates concurrently its own arena (up to 8 per core), and
    freed tensor memory stays in the arena that held it: with many request threads the
    server's resident memory grows with the number of threads, not with what is in use.
    ``mallopt`` sets the cap at run time, for arenas made from now on.

    Returns:
        The cap set, or None (none asked, or no glibc).
    """
    mallopt = glibc_function("mallopt") if arenas is not None else None
    if mallopt is None:
        return None
    return arenas if mallopt(M_ARENA_MAX, arenas) == 1 else None


def trim_memory_every(seconds: float) -> threading.Thread | None:
    """Hand freed heap memory back to the system every ``seconds`` (glibc ``malloc_trim``).

    A forward pass at a high resolution frees hundreds of MB when it ends, but glibc keeps
    freed chunks that sit below live ones in its heaps, so the server's resident memory stays
    at its high mark between requests and the next concurrent requests stack on top of it.
    ``malloc_trim(0)`` releases every free page of every arena.

    Returns:
        The daemon thread, or None where there is no glibc or ``seconds`` is 0 (off).
    """
    trim = glibc_function("malloc_trim") if seconds > 0 else None
    if trim is None:
        return None

    def loop() -> None:
        while True:
            time.sleep(seconds)
            trim(0)

    thread = threading.Thread(target=loop, name="malloc-trim", daemon=True)
    thread.start()
    return thread


def keep_freed_memory(trim_threshold: int = 1 << 30, top_pad: int = 64 << 20) -> bool:
    """Keep the memory a training step frees for the next step, instead of handing it back
    to the system and faulting it in again (glibc ``mallopt``).

    glibc returns a heap's free top to the system once it exceeds the trim threshold (by
    default twice the mmap threshold, which follows the largest chunk freed so far), and
    maps large blocks afresh each time. A training step allocates and frees the same tens of
    MB of activations and gradients every step, so by default each step pays for ~2×10⁴ page
    faults (the kernel zeroing every page again): BENCHMARKS.md, "Session 20", measured
    1.16–1.31× the training images/s with this on. Meant for a process that only trains (a
    grid worker, a live run's trainer: `explorer.trainer_process`): a server keeps its heap
    small instead (`trim_memory_every`).

    Returns:
        Whether glibc took all three settings (False without glibc).
    """
    mallopt = glibc_function("mallopt")
    if mallopt is None:
        return False
    return all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD), (M_TRIM_THRESHOLD, trim_threshold),
        (M_TOP_PAD, top_pad)))
