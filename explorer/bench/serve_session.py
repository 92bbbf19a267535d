"""The mixed-session load test behind `python -m explorer.bench serve` (see serve.py).

One user = one `gradio_client.Client` (its own server session) doing, in order: ``/tokens``,
``/attention``, three ``/attention_views`` re-renders (a layer, a head fusion, a colour map),
``/distance`` (random init and CNN on, the UI's defaults) and ``/igpt_complete`` (4
completions, the UI's defaults). All users start together.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageOps

from explorer.bench.serve import EXAMPLE, ROOT, percentile, start_app

EXAMPLES = sorted((ROOT / "assets" / "examples").glob("*.jpg")) or [EXAMPLE]
RERENDERS = [  # layer, fusion, roll_fusion, discard, start, keep, opacity, cmap
    (6, "mean", "mean", 0.0, 1, 0.6, 0.6, "inferno"),
    (6, "max", "mean", 0.0, 1, 0.6, 0.6, "inferno"),
    (6, "max", "mean", 0.0, 1, 0.6, 0.6, "viridis"),
]


def user_photos(n: int, folder: Path) -> list[str]:
    """``n`` distinct photos: the examples, mirrored and shifted by a few pixels per user."""
    paths = []
    for i in range(n):
        image = Image.open(EXAMPLES[i % len(EXAMPLES)]).convert("RGB")
        if (i // len(EXAMPLES)) % 2:
            image = ImageOps.mirror(image)
        shift = i // (2 * len(EXAMPLES))
        image = image.crop((shift, shift, image.width, image.height))
        path = folder / f"user{i}.jpg"
        image.save(path, quality=92)
        paths.append(str(path))
    return paths


def session(client, photo: str, size: int, record) -> None:
    """One user's session; ``record(call, seconds or exception)`` after each call."""
    from gradio_client import handle_file

    img = handle_file(photo)
    calls = [("tokens", lambda: client.predict(img, None, size, size, "crop", api_name="/tokens")),
             ("attention", lambda: client.predict(img, None, size, size, "crop", 12, "mean", "mean",
                                                  0.0, 1, 0.6, 0.6, "inferno", "mean",
                                                  api_name="/attention"))]
    calls += [("attention_views", lambda s=s: client.predict(*s, api_name="/attention_views"))
              for s in RERENDERS]
    calls += [("distance", lambda: client.predict(img, None, [], True, True, size, size, "crop",
                                                  "drop", api_name="/distance")),
              ("igpt_complete", lambda: client.predict(img, None, 14, 4, 1.0, 0, 1.0, 0,
                                                       "exact (fp32)", api_name="/igpt_complete"))]
    for name, call in calls:
        start = time.perf_counter()
        try:
            call()
            record(name, time.perf_counter() - start)
        except Exception as err:  # count, report, keep going
            record(name, err)


class PeakRSS:
    """Samples the summed RSS of a process and its children until stopped."""

    def __init__(self, pid: int, every: float = 0.1):
        import psutil

        self.proc, self.every, self.peak = psutil.Process(pid), every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            self._stop.wait(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def one_run(users: int, size: int, photos: list[str], env: dict) -> dict:
    """Start the app, warm it with one session, then run ``users`` sessions at once."""
    from gradio_client import Client

    proc, url, _ = start_app(env)
    try:
        rss = PeakRSS(proc.pid)
        session(Client(url, verbose=False), str(EXAMPLE), size, lambda *_: None)  # load models
        times: dict[str, list[float]] = defaultdict(list)
        errors: list[str] = []
        lock = threading.Lock()

        def record(name, result):
            with lock:
                if isinstance(result, Exception):
                    errors.append(f"{name}: {type(result).__name__}: {result}")
                else:
                    times[name].append(result)

        clients = [Client(url, verbose=False) for _ in range(users)]
        start = time.perf_counter()
        threads = [threading.Thread(target=session, args=(c, photos[i], size, record))
                   for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        peak = rss.stop()
    finally:
        proc.terminate()
        proc.wait()
    return {"users": users, "size": size, "times": dict(times), "errors": errors,
            "wall": wall, "peak_rss": peak}


def format_run(r: dict) -> str:
    def p(values):
        return f"{percentile(values, 50):.2f} / {percentile(values, 95):.2f}" if values else "-"

    every = [t for ts in r["times"].values() for t in ts]
    calls = sum(len(ts) for ts in r["times"].values()) + len(r["errors"])
    cells = [str(r["users"]), f"{r['size']}", f"{len(r['errors'])} / {calls}", p(every)]
    cells += [p(r["times"].get(name, [])) for name in
              ("tokens", "attention", "attention_views", "distance", "igpt_complete")]
    cells += [f"{r['wall']:.1f}", f"{r['peak_rss'] / 2**30:.2f}"]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| users | px | errors | all calls p50 / p95 (s) | tokens | attention | "
          "attention_views (re-render) | distance | igpt_complete | wall (s) | peak RSS (GiB) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def run(users: list[int], sizes: list[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        photos = user_photos(max(users), Path(tmp))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        rows = []
        for size in sizes:
            for n in users:
                r = one_run(n, size, photos, env)
                rows.append(format_run(r))
                print(rows[-1], flush=True)
                for err in r["errors"][:3]:
                    print("error:", err, flush=True)
    print(HEADER)
    print("\n".join(rows))
