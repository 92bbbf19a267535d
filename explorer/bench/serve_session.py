"""The mixed-session load test behind `python -m explorer.bench serve` (see serve.py), and the
app it drives (`start_app`: ``app.py`` in a subprocess on a free port).

One user = one `gradio_client.Client` (its own server session) doing, in order: ``/tokens``,
``/attention``, three ``/attention_views`` re-renders (a layer, a head fusion, a colour map),
``/distance`` (random init and CNN on, the UI's defaults) and ``/igpt_complete`` (4
completions below 14 rows, exact decoder, a fresh seed: never served from memory). All users
start together; ``only`` keeps a subset of the calls (e.g. just ``igpt_complete``).

What a session costs the server is read from its CPU time (the app process and its
children, user + system): per call type from one session run alone after the warm-up, and
per session from the whole N-user run (the CPU time it took, divided by N).
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "assets" / "examples" / "chelsea.jpg"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(env: dict, output=subprocess.DEVNULL,
              timeout: float | None = None) -> tuple[subprocess.Popen, str, float]:
    """Start app.py on a free port; return the process, its URL and seconds until the page
    was served (the benchmarks and the browser tests' app).

    Args:
        output: where the app's stdout and stderr go (a file for a log).
        timeout: give up (and kill the app) after this many seconds; None waits.
    """
    port = _free_port()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    while timeout is None or time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited during start-up (code {proc.returncode})")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return proc, url, time.perf_counter() - start
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"app.py did not serve within {timeout:.0f} s")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (1..99), interpolated between samples."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]



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


CALLS = ("tokens", "attention", "attention_views", "distance", "igpt_complete")


def session(client, photo: str, size: int, record, only: set[str] | None = None,
            cpu=None) -> None:
    """One user's session; ``record(call, seconds or exception, CPU-seconds or None)`` after
    each call. ``only``: the call types to make (default: all); ``cpu()``: the server's CPU
    seconds so far, read around each call (meaningful when this session runs alone)."""
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
              ("igpt_complete", lambda: client.predict(img, None, 14, 4, 1.0, 0, 1.0, None,
                                                       "exact (fp32)", api_name="/igpt_complete"))]
    for name, call in calls:
        if only is not None and name not in only:
            continue
        start, cpu_start = time.perf_counter(), cpu() if cpu else None
        try:
            call()
            record(name, time.perf_counter() - start, cpu() - cpu_start if cpu else None)
        except Exception as err:  # count, report, keep going
            record(name, err, None)


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


def server_cpu(pid: int):
    """A function giving the CPU seconds (user + system) of a process and its children."""
    import psutil

    proc = psutil.Process(pid)

    def seconds() -> float:
        total = 0.0
        for p in (proc, *proc.children(recursive=True)):
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    return seconds


def one_run(users: int, size: int, photos: list[str], env: dict,
            only: set[str] | None = None) -> dict:
    """Start the app, warm it with one session, measure one session alone (CPU per call),
    then run ``users`` sessions at once."""
    from gradio_client import Client

    proc, url, _ = start_app(env)
    try:
        rss, cpu = PeakRSS(proc.pid), server_cpu(proc.pid)
        nothing = lambda *_: None  # noqa: E731
        session(Client(url, verbose=False), str(EXAMPLE), size, nothing, only)  # load models
        alone: dict[str, list[float]] = defaultdict(list)
        session(Client(url, verbose=False), photos[-1], size,
                lambda name, _, seconds: alone[name].append(seconds or 0.0), only, cpu)
        times: dict[str, list[float]] = defaultdict(list)
        errors: list[str] = []
        lock = threading.Lock()

        def record(name, result, _cpu):
            with lock:
                if isinstance(result, Exception):
                    errors.append(f"{name}: {type(result).__name__}: {result}")
                else:
                    times[name].append(result)

        clients = [Client(url, verbose=False) for _ in range(users)]
        start, cpu_start = time.perf_counter(), cpu()
        threads = [threading.Thread(target=session, args=(c, photos[i], size, record, only))
                   for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall, cpu_run = time.perf_counter() - start, cpu() - cpu_start
        peak = rss.stop()
    finally:
        proc.terminate()
        proc.wait()
    return {"users": users, "size": size, "times": dict(times), "errors": errors,
            "wall": wall, "peak_rss": peak, "cpu_alone": {k: sum(v) for k, v in alone.items()},
            "cpu_per_session": cpu_run / users}


def format_run(r: dict) -> str:
    def p(values):
        return f"{percentile(values, 50):.2f} / {percentile(values, 95):.2f}" if values else "-"

    every = [t for ts in r["times"].values() for t in ts]
    calls = sum(len(ts) for ts in r["times"].values()) + len(r["errors"])
    cells = [str(r["users"]), f"{r['size']}", f"{len(r['errors'])} / {calls}", p(every)]
    cells += [p(r["times"].get(name, [])) for name in CALLS]
    cells += [f"{r['wall']:.1f}", f"{r['peak_rss'] / 2**30:.2f}"]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| users | px | errors | all calls p50 / p95 (s) | tokens | attention | "
          "attention_views (re-render) | distance | igpt_complete | wall (s) | peak RSS (GiB) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


CAPACITY_HEADER = ("| users | px | CPU-s per session, alone: "
                   + ", ".join(CALLS) + " = total | CPU-s per session in the run |\n"
                   "|---|---|---|---|")


def format_capacity(r: dict) -> str:
    alone = r["cpu_alone"]
    parts = ", ".join(f"{alone[c]:.2f}" if c in alone else "-" for c in CALLS)
    return (f"| {r['users']} | {r['size']} | {parts} = {sum(alone.values()):.2f} | "
            f"{r['cpu_per_session']:.2f} |")


def students_per_vcpu(runs: list[dict], p95: float, vcpus: int) -> list[str]:
    """Lines saying how many students a vCPU serves with all calls' p95 <= ``p95`` s: the
    largest measured burst that kept it, and the burst model's estimate (N students who
    start together are N x S CPU-seconds on V vCPUs; the p95 call ends near the burst's
    end, N x S / V, so N / V <= p95 / S), S being the CPU-seconds a session cost in the run."""
    lines = []
    for size in sorted({r["size"] for r in runs}):
        rows = sorted((r for r in runs if r["size"] == size), key=lambda r: r["users"])
        ok = [r["users"] for r in rows
              if not r["errors"] and percentile([t for ts in r["times"].values() for t in ts],
                                                95) <= p95]
        busiest = rows[-1]
        est = p95 / busiest["cpu_per_session"]
        measured = (f"{max(ok)} users (of {', '.join(str(r['users']) for r in rows)} measured)"
                    f", {max(ok) / vcpus:.1f} per vCPU" if ok else "none of the measured")
        lines.append(f"- {size} px, p95 <= {p95:g} s: measured {measured}; estimate from "
                     f"{busiest['cpu_per_session']:.2f} CPU-s per session "
                     f"({busiest['users']} users): {est:.1f} students per vCPU")
    return lines


def run(users: list[int], sizes: list[int], only: set[str] | None = None,
        p95: float = 6.0) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        photos = user_photos(max(users) + 1, Path(tmp))  # the last one: the session alone
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        runs, rows = [], []
        for size in sizes:
            for n in users:
                r = one_run(n, size, photos, env, only)
                runs.append(r)
                rows.append(format_run(r))
                print(rows[-1], flush=True)
                for err in r["errors"][:3]:
                    print("error:", err, flush=True)
    print(HEADER)
    print("\n".join(rows))
    if len(users) > 1 and only is not None:
        for size in sizes:
            walls = {r["users"]: r["wall"] for r in runs if r["size"] == size}
            first = walls[min(walls)]
            ratios = ", ".join(f"{n} users {w / first:.2f}x" for n, w in walls.items())
            print(f"\n{size} px: wall of {ratios} the wall of {min(walls)} user(s)")
    print("\n" + CAPACITY_HEADER)
    print("\n".join(format_capacity(r) for r in runs))
    print(f"\nStudents per vCPU ({os.cpu_count()} vCPUs here):")
    print("\n".join(students_per_vcpu(runs, p95, os.cpu_count() or 1)))
