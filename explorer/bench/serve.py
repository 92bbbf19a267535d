"""Serving benchmark: a lecture hall's mixed sessions, or cold start and first model load.

    python -m explorer.bench serve [--users 1,8,32] [--sizes 224,518] [--p95 6]
    python -m explorer.bench serve --only igpt_complete --users 1,8 --sizes 224
    python -m explorer.bench serve --first-load [--clients 8] [--requests 5] [--size 224]

The default drives the real app (``app.py`` in a subprocess, restarted for each users x size
so every peak is its own) with N `gradio_client` users at once, each doing one session on
its own photo (a bundled example, flipped and shifted per user, so no two users send the same
bytes): ``/tokens``, ``/attention``, three slider re-renders (``/attention_views``),
``/distance`` and ``/igpt_complete``. It prints, per users x size: errors, p50/p95 per call
type and over all calls, wall time, and the server's peak RSS (the app process and its
children, sampled every 0.1 s), then what a session costs in CPU-seconds (per call type,
one session alone; per session, in the run) and how many students a vCPU serves at the
chosen p95 (`serve_session.students_per_vcpu`). ``--only`` keeps some call types (e.g. 8
students completing their own photos at once, against one alone). ``--first-load`` is the
earlier /tokens-only table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from explorer.bench import serve_session
from explorer.bench.serve_session import EXAMPLE, ROOT, percentile, start_app


def call_tokens(client, size: int) -> float:
    from gradio_client import handle_file

    start = time.perf_counter()
    client.predict(handle_file(str(EXAMPLE)), None, size, size, "crop", api_name="/tokens")
    return time.perf_counter() - start


def load_test(url: str, clients: int, requests: int, size: int) -> tuple[list[float], list[str], float]:
    """``clients`` concurrent sessions, each sending ``requests`` sequential requests."""
    from gradio_client import Client

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    sessions = [Client(url, verbose=False) for _ in range(clients)]

    def session(client) -> None:
        for _ in range(requests):
            try:
                seconds = call_tokens(client, size)
                with lock:
                    latencies.append(seconds)
            except Exception as err:  # count, report, keep going
                with lock:
                    errors.append(f"{type(err).__name__}: {err}")

    start = time.perf_counter()
    threads = [threading.Thread(target=session, args=(c,)) for c in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors, time.perf_counter() - start


def model_load_rows() -> list[tuple[str, str]]:
    """Time the offline default's first load (ONNX conversion) and a load from the cache."""
    from dataclasses import replace

    from explorer import models, settings

    before = settings.current()
    with tempfile.TemporaryDirectory() as cache:
        settings.install(replace(before, cache_dir=Path(cache)))
        try:
            start = time.perf_counter()
            models.build_vit(None)
            converted = time.perf_counter() - start
            start = time.perf_counter()
            models.build_vit(None)
            cached = time.perf_counter() - start
        finally:
            settings.install(before)
    return [("default model, first load: ONNX -> timm conversion + safetensors write + build",
             f"{converted:.2f} s"),
            ("default model, later loads: safetensors from cache + build", f"{cached:.2f} s")]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m explorer.bench serve")
    parser.add_argument("--users", default="1,8,32", help="comma-separated user counts")
    parser.add_argument("--sizes", default="224,518", help="comma-separated image sides (px)")
    parser.add_argument("--only", default=None,
                        help="comma-separated call types to make (default: the whole session)")
    parser.add_argument("--p95", type=float, default=6.0,
                        help="the p95 latency (s) the students-per-vCPU figure is for")
    parser.add_argument("--first-load", action="store_true",
                        help="the /tokens-only table: cold start, first load, --clients x --requests")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=5, help="per client")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args(argv)
    if not args.first_load:
        only = set(args.only.split(",")) if args.only else None
        if only and not only <= set(serve_session.CALLS):
            raise SystemExit(f"--only takes some of: {', '.join(serve_session.CALLS)}")
        serve_session.run([int(u) for u in args.users.split(",")],
                          [int(s) for s in args.sizes.split(",")], only, args.p95)
        return
    from gradio_client import Client

    rows = model_load_rows()
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "VIT_EXPLORER_CACHE": cache, "PYTHONPATH": str(ROOT)}
        proc, url, cold = start_app(env)
        try:
            rows.append(("cold start: `python app.py` to first served page", f"{cold:.1f} s"))
            client = Client(url, verbose=False)
            first = call_tokens(client, args.size)
            rows.append((f"first /tokens request {args.size}px, empty cache (ONNX conversion + load + views)",
                         f"{first:.1f} s"))
            warm = [call_tokens(client, args.size) for _ in range(3)]
            rows.append((f"upload to all views rendered, {args.size}px, model warm (median of 3)",
                         f"{statistics.median(warm):.2f} s"))
        finally:
            proc.terminate()
            proc.wait()
        # Restart on the now-filled cache: the model loads from safetensors, no conversion.
        proc, url, cold = start_app(env)
        try:
            client = Client(url, verbose=False)
            first = call_tokens(client, args.size)
            rows.append((f"first /tokens request {args.size}px, converted weights cached", f"{first:.1f} s"))
            latencies, errors, wall = load_test(url, args.clients, args.requests, args.size)
        finally:
            proc.terminate()
            proc.wait()
    total = args.clients * args.requests
    rows.append((f"{args.clients} concurrent clients x {args.requests} requests: errors",
                 f"{len(errors)} / {total}"))
    if latencies:
        rows.append(("... latency p50 / p95", f"{percentile(latencies, 50):.2f} s / "
                     f"{percentile(latencies, 95):.2f} s"))
        rows.append(("... throughput", f"{len(latencies) / wall:.2f} requests/s over {wall:.1f} s"))
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    for err in errors[:5]:
        print("error:", err)
    if errors:
        sys.exit(1)
