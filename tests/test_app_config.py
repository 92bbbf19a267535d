"""How `python app.py` is configured and tuned before serving: one settings object from the
command line and the environment (`explorer.settings`), malloc arenas, heap trimming, torch
threads and the GIL interval (`explorer.tuning`), and no GPU compiler loaded on a CPU-only
machine."""

from __future__ import annotations

import ast
import os
import platform
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

import app
from explorer import settings, tuning
from explorer.settings import Settings

ROOT = Path(app.__file__).resolve().parent
glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")


def test_settings_come_from_the_environment_and_the_command_line_wins():
    env = {"VIT_EXPLORER_CONCURRENCY": "5", "VIT_EXPLORER_STORE_MB": "1.5",
           "VIT_EXPLORER_SHARE_FINETUNES": "yes", "VIT_EXPLORER_WEB_HUB": "off",
           "VIT_EXPLORER_DATA_DIR": "/srv/data", "GRADIO_SERVER_PORT": "9000",
           "XDG_CACHE_HOME": "/var/cache", "VIT_EXPLORER_LAB_STEPS": "20"}
    s = Settings.from_env(env)
    assert (s.concurrency, s.store_mb, s.share_finetunes, s.web_hub) == (5, 1.5, True, False)
    assert (s.data_dir, s.port, s.lab_steps) == (Path("/srv/data"), 9000, 20)
    assert s.cache_dir == Path("/var/cache/vit-explorer")  # XDG, when not set directly
    assert s.models_dir is None and s.view_concurrency == Settings().view_concurrency
    flags = Settings.parse(["--concurrency", "1", "--port", "7000", "--share",
                            "--models-dir", "/srv/models", "--web-hub"], env)
    assert (flags.concurrency, flags.port, flags.share, flags.web_hub) == (1, 7000, True, True)
    assert flags.models_dir == Path("/srv/models") and flags.store_mb == 1.5  # env still counts
    with pytest.raises(ValueError, match="VIT_EXPLORER_QUEUE='many'"):
        Settings.from_env({"VIT_EXPLORER_QUEUE": "many"})
    with pytest.raises(ValueError, match="VIT_EXPLORER_WEB_HUB='maybe'"):
        Settings.from_env({"VIT_EXPLORER_WEB_HUB": "maybe"})


def test_glibcs_own_arena_variable_wins_over_ours():
    env = {"VIT_EXPLORER_MALLOC_ARENAS": "3"}
    assert Settings.from_env(env).malloc_arenas == 3
    assert Settings.from_env({**env, "MALLOC_ARENA_MAX": "4"}).malloc_arenas is None


def test_current_settings_are_the_installed_ones(monkeypatch):
    monkeypatch.setattr(settings, "_current", None)
    monkeypatch.setenv("VIT_EXPLORER_CACHE", "/tmp/from-env")
    assert settings.current().cache_dir == Path("/tmp/from-env")  # read once, on first use
    settings.install(Settings(cache_dir=Path("/tmp/installed")))
    from explorer import models

    assert models.cache_dir() == Path("/tmp/installed")


def test_the_readme_table_lists_every_setting():
    """One row per field: its flag and its variable (the README's "Settings" table)."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Settings"):]
    table = table[:table.index("\n## ", 4)]
    rows = [line for line in table.splitlines() if line.startswith("| `--")]
    assert len(rows) == len(fields(Settings))
    for f, row in zip(fields(Settings), rows, strict=True):
        assert row.startswith(f"| `--{f.name.replace('_', '-')}`"), row
        if f.metadata["env"]:
            assert f"`{f.metadata['env']}`" in row, row


def test_nothing_else_reads_the_environment_for_a_setting():
    """Only `explorer.settings` reads ``os.environ``, save the switches that act where they are
    read (their reason is in a comment there) and command-line tools' own launchers."""
    allowed = {"explorer/settings.py",
               "explorer/__init__.py",  # the Triton opt-out: before torch is imported
               "explorer/kernels/__init__.py",  # the kernel switch, read per call
               "explorer/hub.py",  # huggingface_hub's own offline switch, read live
               "explorer/gpu.py",  # the platform's ZeroGPU flag, read when a function is decorated
               "explorer/finetune/__main__.py"}  # the launcher's RANK (a CLI, not the app)
    readers = set()
    for path in [*ROOT.glob("explorer/**/*.py"), ROOT / "app.py"]:
        if "bench" in path.parts:  # benchmarks start servers with environments of their own
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv")
                    and isinstance(node.value, ast.Name) and node.value.id == "os"):
                readers.add(str(path.relative_to(ROOT)))
    assert readers <= allowed, readers - allowed


@glibc
def test_malloc_arenas_are_capped_when_asked():
    assert tuning.cap_malloc_arenas(3) == 3
    assert tuning.cap_malloc_arenas(None) is None  # glibc's own choice (MALLOC_ARENA_MAX)


@glibc
def test_the_arena_cap_holds_for_threads_that_allocate_at_once():
    """With the cap, 16 threads allocating together share 2 arenas (glibc's malloc_stats
    counts them); without it each thread may get its own."""
    code = """
import ctypes, sys, threading
from explorer import tuning
if sys.argv[1] == "capped":
    tuning.cap_malloc_arenas(2)
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
                              cwd=ROOT, timeout=120)
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
from explorer import tuning
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
thread = tuning.trim_memory_every(float(sys.argv[1]))
time.sleep(0.6)
print(thread is not None, round(held - rss()))
"""
    released = {}
    for seconds in ("0", "0.1"):
        started, mb = _fresh_process(code, seconds).split()
        released[seconds] = (started, int(mb))
    assert released["0"][0] == "False" and released["0"][1] < 50  # off: the pages stay
    assert released["0.1"][0] == "True" and released["0.1"][1] > 250  # on: ~300 MB returned


def _fresh_process(code: str, arg: str) -> str:
    """The stdout of ``code`` run with ``arg`` in a fresh Python (glibc's heap settings are
    the whole process's, and cannot be put back)."""
    done = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_a_training_process_keeps_the_memory_its_steps_free():
    # A training step frees and allocates again the same tens of MB: the lab CNN's first
    # activation alone is 128 × 24 × 28 × 28 × 4 B = 9.6 MB, 2,352 pages. With glibc's
    # default policy those pages often go back to the system and fault in again: per step,
    # 0 to 27k minor faults, a median of 2k-9k in most processes, but glibc's dynamic
    # thresholds make it vary from process to process (CI measured a mean of 878 once). A
    # grid worker's `keep_freed_memory` reuses them: the median step faults no page at all
    # (measured: 16 to 18 of 20 steps fault none; a few grow the heap once)
    code = """
import resource, sys
import torch
import torch.nn.functional as F
from explorer import tuning
from explorer.lab.engine import LabRun
from explorer.lab.models import build
torch.set_num_threads(1)
kept = tuning.keep_freed_memory() if sys.argv[1] == "keep" else False
model = build(LabRun("cnn", 500, 0).spec, seed=0).to(memory_format=torch.channels_last)
opt = torch.optim.AdamW(model.parameters())
x = torch.randn(128, 3, 28, 28).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (128,))
def step():
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
for _ in range(3):
    step()
per_step = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    per_step.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, sorted(per_step)[10], sum(per_step))
"""
    faults = {}
    for variant in ("default", "keep"):
        kept, median, total = _fresh_process(code, variant).split()[-3:]
        faults[variant] = (kept, int(median), int(total))
    assert faults["keep"][0] == "True"  # glibc took the settings
    assert faults["keep"][1] == 0  # the median step reuses what the last one freed
    assert faults["keep"][2] * 2 < faults["default"][2]


def test_torch_threads_split_the_cores_between_parallel_requests():
    assert tuning.threads_per_request(2, cores=2) == 1
    assert tuning.threads_per_request(2, cores=16) == 8
    assert tuning.threads_per_request(4, cores=2) == 1  # never none


def test_tune_sets_threads_and_the_gil_interval_from_the_settings():
    import torch
    before, switch = torch.get_num_threads(), sys.getswitchinterval()
    try:
        tuning.tune(Settings(torch_threads=1, malloc_trim_s=0, malloc_arenas=None))
        assert torch.get_num_threads() == 1
        assert sys.getswitchinterval() == pytest.approx(0.001)  # the default: 1 ms
        tuning.tune(Settings(torch_threads=2, gil_switch_ms=5, malloc_trim_s=0,
                             malloc_arenas=None))  # Python's own interval
        assert torch.get_num_threads() == 2 and sys.getswitchinterval() == pytest.approx(0.005)
    finally:
        torch.set_num_threads(before)
        sys.setswitchinterval(switch)


def _triton_after_imports(env_extra: dict) -> str:
    """What ``sys.modules`` holds for triton after the app's imports, in a fresh process."""
    code = ("import sys, app, torchvision, timm; app.build_demo(); "
            "print(repr(sys.modules.get('triton', 'absent')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                               "HOME": "/tmp", **env_extra},
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl"), reason="a GPU machine keeps Triton")
def test_triton_is_kept_out_of_a_cpu_only_server():
    from importlib.machinery import PathFinder  # (importlib.util.find_spec reads sys.modules)

    assert _triton_after_imports({}) == "None"  # torch reads the None entry as "not installed"
    if PathFinder.find_spec("triton") is not None:  # installed with the CUDA wheel: it loads
        assert _triton_after_imports({"VIT_EXPLORER_TRITON": "1"}).startswith("<module 'triton'")
