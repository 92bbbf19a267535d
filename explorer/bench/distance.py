"""Benchmark: mean attention distance over a dataset vs the plain fused forwards.

``python -m explorer.bench distance [--images 128] [--size 224] [--batch 32]``

One run, batch by batch interleaved: for each batch of Fashion-MNIST images (already
resized and normalised, so both sides time the model work only) the plain fused
``forward_features`` and then ours (`capture` + one distance contraction per layer).
A second table times only the post-processing at 518 px on one image's maps: the distance
of all 12 layers by one ``einsum`` per layer against a broadcast-and-sum version.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from explorer.attention import capture
from explorer.bench.machine import describe
from explorer.distance import (
    dataset_mean_attention_distance,
    fashion_mnist_images,
    mean_attention_distance,
    model_mean_attention_distance,
    patch_distance_matrix,
)
from explorer.images import prepare_pixels
from explorer.models import load_vit


def _broadcast_distance(stack: torch.Tensor, grid, patch, p) -> torch.Tensor:
    """The slow way, for comparison: materialise (B, H, n, n) products and sum."""
    dist = patch_distance_matrix(grid, patch)
    out = []
    for a in stack:
        w = a[..., p:, p:]
        w = w / w.sum(-1, keepdim=True)
        out.append((w * dist).sum(-1).mean(-1).mean(0))
    return torch.stack(out)


def dataset_table(n_images: int, size: int, batch: int, rounds: int) -> list[str]:
    model, cfg = load_vit(None)
    images = fashion_mnist_images(n_images)
    pixels = torch.cat([prepare_pixels(im, cfg, (size, size)) for im in images])
    plain_t, ours_t = [0.0] * rounds, [0.0] * rounds
    plain_cpu, ours_cpu = [0.0] * rounds, [0.0] * rounds
    ratios = []
    with torch.no_grad():
        model.forward_features(pixels[:batch])  # warm-up both paths
        maps = capture(model, pixels[:batch])
        mean_attention_distance(maps, maps.grid, maps.patch_size, maps.num_prefix_tokens)
        for r in range(rounds):  # each round: all images, batch by batch, plain then ours
            for i in range(0, n_images, batch):
                x = pixels[i : i + batch]
                start, start_cpu = time.perf_counter(), time.process_time()
                model.forward_features(x)
                plain = time.perf_counter() - start
                plain_cpu[r] += time.process_time() - start_cpu
                start, start_cpu = time.perf_counter(), time.process_time()
                d = model_mean_attention_distance(model, x, per_image=True)
                ours = time.perf_counter() - start
                ours_cpu[r] += time.process_time() - start_cpu
                assert d.shape == (x.shape[0], 12, 6)
                plain_t[r] += plain
                ours_t[r] += ours
                ratios.append(ours / plain)
    start = time.perf_counter()
    stats = dataset_mean_attention_distance(model, cfg, images, (size, size), batch_size=batch)
    end_to_end = time.perf_counter() - start
    plain, ours = statistics.median(plain_t), statistics.median(ours_t)
    pc, oc = statistics.median(plain_cpu), statistics.median(ours_cpu)
    return [
        f"{n_images} Fashion-MNIST images at {size}x{size}, batches of {batch}, "
        f"DINOv2 ViT-S/14 (offline default), fp32, {torch.get_num_threads()} threads; "
        f"median over {rounds} rounds, each round interleaved batch by batch",
        "",
        f"| variant | wall s per {n_images} images | images/s | wall × plain | CPU s | CPU × plain |",
        "|---|---|---|---|---|---|",
        f"| plain fused `forward_features` | {plain:.2f} | {n_images / plain:.1f} | 1.00× "
        f"| {pc:.2f} | 1.00× |",
        f"| **ours**: `model_mean_attention_distance` (per image and head) | {ours:.2f} | "
        f"{n_images / ours:.1f} | **{ours / plain:.2f}×** | {oc:.2f} | **{oc / pc:.2f}×** |",
        f"| ours end to end once (`dataset_mean_attention_distance`, incl. resizing) | "
        f"{end_to_end:.2f} | {stats.images_per_second:.1f} | {end_to_end / plain:.2f}× | | |",
        "",
        f"per-batch ratio ours/plain over {len(ratios)} batch pairs: median "
        f"{statistics.median(ratios):.2f}×, min {min(ratios):.2f}×, max {max(ratios):.2f}×",
    ]


def postprocessing_table(size: int = 518, repeats: int = 5) -> list[str]:
    model, _ = load_vit(None)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        maps = capture(model, x)
        grid, patch, p = maps.grid, maps.patch_size, maps.num_prefix_tokens
        stack = maps.stack()  # (12, 1, 6, N, N) computed once: only the reductions are timed
        ours_t, slow_t = [], []
        for _ in range(repeats):  # interleaved
            start = time.perf_counter()
            ours = mean_attention_distance(stack, grid, patch, p)
            ours_t.append(time.perf_counter() - start)
            start = time.perf_counter()
            slow = _broadcast_distance(stack, grid, patch, p)
            slow_t.append(time.perf_counter() - start)
        torch.testing.assert_close(ours, slow, atol=1e-3, rtol=1e-4)
    return [
        f"Post-processing only, one image at {size} px ({grid[0]}x{grid[1]} patches), all 12 "
        f"layers' maps precomputed ({stack.numel() * 4 / 1e6:.0f} MB), median of {repeats}",
        "",
        "| distance of all 12 layers | ms |",
        "|---|---|",
        f"| **ours**: precomputed (n, N) distance matrix, one `einsum` per layer | "
        f"{statistics.median(ours_t) * 1e3:.0f} |",
        f"| broadcast `(w * dist).sum(-1)` with renormalised patch block | "
        f"{statistics.median(slow_t) * 1e3:.0f} |",
    ]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m explorer.bench distance")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-dataset", action="store_true", help="only the 518 px table")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# Mean attention distance; CPU: {describe()}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"load average before: {os.getloadavg()[0]:.2f}\n")
    if not args.skip_dataset:
        print("\n".join(dataset_table(args.images, args.size, args.batch, args.rounds)))
        print()
    print("\n".join(postprocessing_table()))
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
