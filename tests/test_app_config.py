"""Process settings `python app.py` makes before serving: malloc arenas, torch threads, and
no GPU compiler loaded on a CPU-only machine."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

import app

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")


@glibc
def test_malloc_arenas_are_capped_unless_the_environment_says_otherwise(monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.setenv("VIT_EXPLORER_MALLOC_ARENAS", "3")
    assert app.configure_memory() == 3
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # glibc read it at start: leave it alone
    assert app.configure_memory() is None


@glibc
def test_the_arena_cap_holds_for_threads_that_allocate_at_once():
    """With the cap, 16 threads allocating together share 2 arenas (glibc's malloc_stats
    counts them); without it each thread may get its own."""
    code = """
import ctypes, sys, threading
import app
if sys.argv[1] == "capped":
    app.configure_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
barrier = threading.Barrier(16)
def work():
    barrier.wait()
    blocks = [libc.malloc(64 * 1024) for _ in range(50)]
    barrier.wait()
    for b in blocks:
        libc.free(b)
threads = [threading.Thread(target=work) for _ in range(16)]
[t.start() for t in threads]
[t.join() for t in threads]
libc.malloc_stats()
"""
    arenas = {}
    for mode in ("capped", "default"):
        done = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
                              cwd=app.__file__.rsplit("/", 1)[0], timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        arenas[mode] = done.stderr.count("Arena ")
    assert arenas["capped"] <= 2 < arenas["default"]


@glibc
def test_freed_heap_memory_goes_back_to_the_system():
    """300 MB in 64 KB blocks (heap, not mmap), all freed but the last: glibc keeps the pages
    (the last block pins the heap's top); the trimming thread hands them back."""
    code = """
import ctypes, sys, time
import psutil
import app
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
rss = lambda: psutil.Process().memory_info().rss / 2**20
blocks = [libc.malloc(64 * 1024) for _ in range(4800)]
for b in blocks:
    ctypes.memset(b, 1, 64 * 1024)
for b in blocks[:-1]:
    libc.free(b)
held = rss()
thread = app.trim_memory_every(float(sys.argv[1]))
time.sleep(0.6)
print(thread is not None, round(held - rss()))
"""
    released = {}
    for seconds in ("0", "0.1"):
        done = subprocess.run([sys.executable, "-c", code, seconds], capture_output=True,
                              text=True, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
                              cwd=app.__file__.rsplit("/", 1)[0], timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        started, mb = done.stdout.split()
        released[seconds] = (started, int(mb))
    assert released["0"][0] == "False" and released["0"][1] < 50  # off: the pages stay
    assert released["0.1"][0] == "True" and released["0.1"][1] > 250  # on: ~300 MB returned


def test_torch_threads_split_the_cores_between_parallel_requests(monkeypatch):
    import torch
    before, switch = torch.get_num_threads(), sys.getswitchinterval()
    try:
        monkeypatch.setenv("VIT_EXPLORER_TORCH_THREADS", "1")
        assert app.configure_threads() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
        sys.setswitchinterval(switch)


def test_the_gil_changes_hands_every_millisecond(monkeypatch):
    before = sys.getswitchinterval()
    try:
        monkeypatch.delenv("VIT_EXPLORER_GIL_SWITCH_MS", raising=False)
        app.configure_threads()
        assert sys.getswitchinterval() == pytest.approx(0.001)
        monkeypatch.setenv("VIT_EXPLORER_GIL_SWITCH_MS", "5")  # Python's own default
        app.configure_threads()
        assert sys.getswitchinterval() == pytest.approx(0.005)
    finally:
        sys.setswitchinterval(before)


def _triton_after_imports(env_extra: dict) -> str:
    """What ``sys.modules`` holds for triton after the app's imports, in a fresh process."""
    code = ("import sys, app, torchvision, timm; app.build_demo(); "
            "print(repr(sys.modules.get('triton', 'absent')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                               "HOME": "/tmp", **env_extra},
                          cwd=app.__file__.rsplit("/", 1)[0], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl"), reason="a GPU machine keeps Triton")
def test_triton_is_kept_out_of_a_cpu_only_server():
    from importlib.machinery import PathFinder  # (importlib.util.find_spec reads sys.modules)

    assert _triton_after_imports({}) == "None"  # torch reads the None entry as "not installed"
    if PathFinder.find_spec("triton") is not None:  # installed with the CUDA wheel: it loads
        assert _triton_after_imports({"VIT_EXPLORER_TRITON": "1"}).startswith("<module 'triton'")
