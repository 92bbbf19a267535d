"""Grid of real completions of held-out images: `python -m explorer.igpt.showcase OUT.png`.

Takes the first Fashion-MNIST test image of each class (the model never trained on the test
set), keeps its top half, and lets the model paint the bottom half several times.
"""

from __future__ import annotations

import argparse

import torch

from explorer.igpt.checkpoint import ASSET_DIR, load_local
from explorer.igpt.data import load_fashion_mnist
from explorer.igpt.plots import completion_grid
from explorer.igpt.sampler import SampleConfig, complete


def first_of_each_class(labels: torch.Tensor, classes: int = 10) -> list[int]:
    """Index of the first test image of each class, class order."""
    return [int((labels == c).nonzero()[0]) for c in range(classes)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="PNG to write")
    p.add_argument("--model", default=str(ASSET_DIR))
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--rows-kept", type=int, default=14)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=4)
    args = p.parse_args(argv)

    m = load_local(args.model)
    images, labels = load_fashion_mnist("test")
    idx = first_of_each_class(labels)
    real = m.palette.quantize(images[idx])  # (10, H, W)
    n, H, W = real.shape
    prefix = real.flatten(1)[:, : args.rows_kept * W].repeat_interleave(args.samples, 0)
    out = complete(m.model, prefix, H * W, SampleConfig(seed=args.seed))
    samples = out.view(n, args.samples, H, W)
    completion_grid(real, samples, m.palette, args.rows_kept, scale=args.scale).save(args.out)
    print(f"wrote {args.out}: test images {idx}, {args.samples} samples each")


if __name__ == "__main__":
    main()
