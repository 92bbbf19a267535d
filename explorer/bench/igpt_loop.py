"""iGPT decode loop: a step for B rows against its floor, and completions alone vs at once.

    python -m explorer.bench igpt_loop [--batches 4,8,32] [--reps 2] [--concurrent 8]

Offline model (8 layers x 192), 28x28 images, the top 14 rows kept, 392 pixels generated.

Part 1, a decode step for B rows: B/4 requests of 4 samples, each of its own image, generated
together; the mean time per step over the whole completion (prefill excluded), runs
interleaved, best of ``--reps``:

- "one loop per request (before)": `sampler.complete_stream` for each request, one after
  another (what each session ran for itself before the shared loop): the sum of their steps;
- "batched, PyTorch step": `batch.DecodeLoop` with `TorchStep`, one lane, one thread;
- "batched, compiled step": `KernelStep`, one lane on one thread; one lane whose step runs
  on every core (OpenMP inside the step); one lane per core (the default: the requests
  split between the lanes, each lane's step on one thread).

Floor: the larger of (bytes one step reads: every weight once, each request's prefix
keys/values once, each row's own keys/values so far, averaged over the steps) / the read
bandwidth, and (FLOPs: 2 per weight per row, 4 x C per cached position per row and layer) /
the fp32 GEMM rate, both measured on one thread in this run.

Part 2, completions through the tab's path in this process (`pipeline.stream_completions`:
4 samples, 14 rows kept, fresh seeds, Fashion-MNIST test images), one alone and
``--concurrent`` at once from as many threads (each its own image): wall seconds,
interleaved. Through the app, the same is `python -m explorer.bench serve --only
igpt_complete --users 1,8 --sizes 224`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import torch

from explorer.bench.igpt import read_bandwidth_gbs, step_bytes
from explorer.bench.machine import describe
from explorer.igpt import batch
from explorer.igpt.sampler import SampleConfig, complete_stream

KEEP_ROWS = 14
SAMPLES = 4


def gemm_gflops(size: int = 1024, reps: int = 5) -> float:
    """Best fp32 matrix-product rate (GFLOP/s) of this thread's torch settings."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_seconds(lambda: a @ b) for _ in range(reps))
    return 2 * size**3 / best / 1e9


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_floor(cfg, rows: int, requests: int, prefix: int, length: int, bandwidth: float,
               gflops: float) -> tuple[float, float]:
    """(bytes floor, FLOP floor) in seconds for one mean step of `rows` rows in `requests`
    groups, each with a shared prefix of `prefix` pixels (+ the start token)."""
    weights, _ = step_bytes(cfg, rows, prefix, length)
    shared = prefix + 1
    own = (length - shared + 1) / 2  # own positions cached, averaged over the steps
    kv_per_position = 4 * cfg.n_layer * 2 * cfg.n_embd
    kv = kv_per_position * (requests * shared + rows * own)
    C, inner = cfg.n_embd, cfg.n_inner or 4 * cfg.n_embd
    matrix_params = cfg.n_layer * (4 * C * C + 2 * C * inner) + C * cfg.n_colors
    flops = rows * (2 * matrix_params + 4 * C * cfg.n_layer * (shared + own))
    return (weights + kv) / (bandwidth * 1e9), flops / (gflops * 1e9)


def images(m, count: int) -> list[torch.Tensor]:
    """Token grids of the first `count` Fashion-MNIST test images."""
    from explorer import datasets
    from explorer.igpt.pipeline import image_tokens

    subset = datasets.fashion_mnist("test", n=count)
    return [image_tokens(subset.image(i), m)[1] for i in range(count)]


def time_loop(model, loop: batch.DecodeLoop, prefixes: list[torch.Tensor], length: int,
              lanes: int = 1) -> float:
    """Seconds per step of the requests' completions: prefilled first, then stepped by
    `lanes` threads, each with its share of the requests (as `DecodeLoop` splits them)."""
    active = [loop.prepare(model, p, SAMPLES, length, SampleConfig(seed=i))
              for i, p in enumerate(prefixes)]
    shares = [active[i::lanes] for i in range(lanes)]
    steps = [0] * lanes

    def lane(i):
        torch.set_num_threads(loop.threads)
        share = shares[i]
        while share:
            share = loop.step_all(share)
            steps[i] += 1

    threads = [threading.Thread(target=lane, args=(i,)) for i in range(lanes) if shares[i]]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return (time.perf_counter() - start) / max(steps)


def time_separate(model, prefixes: list[torch.Tensor], length: int) -> float:
    """Mean seconds per step, summed over the requests, each completed by its own
    `complete_stream` loop (the prefill's first pick excluded)."""
    torch.set_num_threads(1)
    total = 0.0
    for i, p in enumerate(prefixes):
        stream = complete_stream(model, p.expand(SAMPLES, -1).contiguous(), length,
                                 SampleConfig(seed=i))
        next(stream)  # prefill and the first pixel
        start = time.perf_counter()
        steps = sum(1 for _ in stream)
        total += (time.perf_counter() - start) / steps
    return total


def completions_wall(m, grids: list[torch.Tensor]) -> float:
    """Seconds until every grid's completion (own thread each, fresh seed) is done."""
    from explorer.igpt.pipeline import stream_completions

    def one(tokens):
        for _ in stream_completions(m, tokens, KEEP_ROWS, SAMPLES, SampleConfig(seed=None)):
            pass

    threads = [threading.Thread(target=one, args=(g,)) for g in grids]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m explorer.bench igpt_loop", description=__doc__)
    p.add_argument("--batches", default="4,8,32", help="rows per step (multiples of 4)")
    p.add_argument("--reps", type=int, default=2, help="interleaved repetitions (best kept)")
    p.add_argument("--concurrent", type=int, default=8, help="completions at once in part 2")
    args = p.parse_args(argv)

    from explorer.igpt.checkpoint import OFFLINE_NAME, load_igpt

    m = load_igpt(OFFLINE_NAME)
    model, cfg = m.model, m.model.config
    length, keep = m.height * m.width, KEEP_ROWS * m.width
    sizes = [int(b) for b in args.batches.split(",")]
    grids = images(m, max(max(sizes) // SAMPLES, args.concurrent))
    prefixes = [g.flatten()[:keep] for g in grids]
    cores = os.cpu_count() or 1
    torch.set_num_threads(1)
    bandwidth, gflops = read_bandwidth_gbs(), gemm_gflops()
    print(f"# iGPT decode loop: offline model, {keep} pixels kept, {length - keep} generated, "
          f"{SAMPLES} samples per request; {describe()}")
    print(f"one thread: read bandwidth {bandwidth:.1f} GB/s, fp32 GEMM {gflops:.0f} GFLOP/s\n")
    variants = {  # name: (loop, lanes)
        "one loop per request (before)": (None, 0),
        "batched, PyTorch step": (batch.DecodeLoop(model, batch.TorchStep()), 1),
        "batched, compiled step, 1 thread": (batch.DecodeLoop(model), 1),
        f"batched, compiled step on {cores} threads": (batch.DecodeLoop(model, threads=cores), 1),
        f"batched, compiled step, {cores} lanes (default)": (batch.DecodeLoop(model), cores),
    }
    times: dict[tuple[int, str], list[float]] = {}
    for _ in range(args.reps):  # interleaved: every variant and size once per round
        for rows in sizes:
            group = prefixes[:rows // SAMPLES]
            for name, (loop, lanes) in variants.items():
                t = (time_separate(model, group, length) if loop is None
                     else time_loop(model, loop, group, length, lanes))
                times.setdefault((rows, name), []).append(t)
    print("| rows B | requests | step | ms per step | bytes floor ms | FLOP floor ms | "
          "÷ floor | vs before |")
    print("|---|---|---|---|---|---|---|---|")
    for rows in sizes:
        byte_floor, flop_floor = step_floor(cfg, rows, rows // SAMPLES, keep, length,
                                            bandwidth, gflops)
        before = min(times[(rows, "one loop per request (before)")])
        for name in variants:
            t = min(times[(rows, name)])
            print(f"| {rows} | {rows // SAMPLES} | {name} | {t * 1e3:.2f} | "
                  f"{byte_floor * 1e3:.2f} | {flop_floor * 1e3:.2f} | "
                  f"{t / max(byte_floor, flop_floor):.2f}× | {before / t:.1f}× |", flush=True)

    alone, together = [], []
    for _ in range(args.reps):
        alone.append(completions_wall(m, grids[:1]))
        together.append(completions_wall(m, grids[:args.concurrent]))
    print(f"\nCompletions through `pipeline.stream_completions` (the shared loop, {cores} lanes): "
          f"one alone {statistics.median(alone):.2f} s, {args.concurrent} at once "
          f"{statistics.median(together):.2f} s "
          f"({statistics.median(together) / statistics.median(alone):.1f}× one alone); "
          f"runs: {', '.join(f'{a:.2f}' for a in alone)} / "
          f"{', '.join(f'{t:.2f}' for t in together)}")
    print(f"read bandwidth again at the end: {read_bandwidth_gbs():.1f} GB/s")
