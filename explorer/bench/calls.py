"""What one request costs the server: time and transient memory per endpoint, in-process.

    python -m explorer.bench calls [--size 518] [--repeats 2]

Runs the functions behind ``/tokens``, ``/attention``, ``/distance`` (random init and CNN on)
and ``/igpt_complete`` (4 completions below 14 rows) in this process, one torch thread, with
`explorer.tuning`'s malloc arena cap, after one warm-up call each (models loaded, model-only
work cached). Each measured call gets a photo no earlier call saw (the first example, shifted
by a few pixels), so no per-image cache helps. Prints, per call: the resident memory before,
the peak above it while the call ran (sampled every 2 ms) and the seconds it took. Freed heap
memory is handed back (`malloc_trim`) before each call, so each peak is that call's own.
The mixed-session load test is `python -m explorer.bench serve`.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from explorer.bench.serve_session import EXAMPLE


class PeakMemory:
    """Samples this process's resident memory until stopped."""

    def __init__(self, every: float = 0.002):
        import psutil

        self.proc, self.every, self.peak = psutil.Process(), every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _photo(folder: Path, i: int) -> str:
    from PIL import Image

    image = Image.open(EXAMPLE).convert("RGB")
    path = folder / f"photo{i}.jpg"
    image.crop((i, i, image.width, image.height)).save(path, quality=92)
    return str(path)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m explorer.bench calls", description=__doc__)
    parser.add_argument("--size", type=int, default=518, help="image side (px)")
    parser.add_argument("--repeats", type=int, default=2, help="measured calls per endpoint")
    args = parser.parse_args(argv)

    import psutil
    import torch

    from explorer import tuning
    from explorer.settings import Settings
    from explorer.ui import attention_tab, distance_tab, igpt_tab, tokens_tab

    tuning.cap_malloc_arenas(Settings.from_env().malloc_arenas)
    torch.set_num_threads(1)
    s = args.size
    calls = {
        "tokens": lambda p: tokens_tab.tokens(p, None, s, s, "crop"),
        "attention": lambda p: attention_tab.analyse_and_render(
            p, None, s, s, "crop", 12, "mean", "mean", 0.0, 1, 0.6, 0.6, "inferno", "mean"),
        "distance": lambda p: distance_tab.per_image(p, None, [], True, True, s, s, "crop",
                                                     "drop", None),
        "igpt_complete": lambda p: list(igpt_tab.complete(p, igpt_tab.OFFLINE_NAME, 14, 4, 1.0,
                                                          0, 1.0, 0)),
    }
    trim = tuning.glibc_function("malloc_trim")
    proc, gib, mib = psutil.Process(), 2**30, 2**20
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for call in calls.values():
            call(_photo(folder, 0))
        print(f"{args.size} px, one torch thread; resident after warm-up "
              f"{proc.memory_info().rss / gib:.2f} GiB")
        print("| call | resident before (GiB) | peak above it (MB) | seconds |\n|---|---|---|---|")
        n = 1
        for name, call in calls.items():
            for _ in range(args.repeats):
                trim(0)
                before = proc.memory_info().rss
                peak, start = PeakMemory(), time.perf_counter()
                call(_photo(folder, n))
                seconds, top = time.perf_counter() - start, peak.stop()
                n += 1
                print(f"| {name} | {before / gib:.2f} | {(top - before) / mib:.0f} | "
                      f"{seconds:.2f} |", flush=True)
