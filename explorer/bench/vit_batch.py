"""Would concurrent analyses gain from sharing one ViT forward? Time per image by batch size.

    python -m explorer.bench vit_batch [--sizes 224,518] [--batches 1,2,4] [--reps 3]

The offline default's architecture (DINOv2 ViT-S/14, random weights: the speed is the same),
one torch thread (what a request gets on a 2-core Space), inference mode; runs interleaved,
best of ``--reps``. If the time per image does not fall with the batch, micro-batching
concurrent requests (Gradio's ``batch=True``) would only make the first one wait.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

from explorer.bench.machine import describe


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m explorer.bench vit_batch", description=__doc__)
    p.add_argument("--sizes", default="224,518")
    p.add_argument("--batches", default="1,2,4")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(1)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518,
                              dynamic_img_size=True).eval()
    best: dict[tuple[int, int], float] = {}
    with torch.inference_mode():
        for size in sizes:
            model(torch.randn(1, 3, size, size))  # warm-up
        for _ in range(args.reps):
            for size in sizes:
                for b in batches:
                    x = torch.randn(b, 3, size, size)
                    start = time.perf_counter()
                    model(x)
                    per_image = (time.perf_counter() - start) / b
                    best[(size, b)] = min(best.get((size, b), per_image), per_image)
    print(f"# ViT-S/14 forward, one thread, {describe()}\n")
    print("| px | " + " | ".join(f"batch {b}: ms per image" for b in batches) + " |")
    print("|---|" + "---|" * len(batches))
    for size in sizes:
        print(f"| {size} | " + " | ".join(f"{best[(size, b)] * 1e3:.0f}" for b in batches) + " |")
