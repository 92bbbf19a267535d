"""Benchmark: attention maps for every layer vs the plain fused forward and two references.

``python -m explorer.bench attention [--sizes 224 518] [--repeats 7]``

All variants run in one process, interleaved round by round (absolute times on shared
machines drift; ratios within one run do not), batch 1, fp32, the offline default model
(DINOv2 ViT-S/14), on a bundled photo (``--input``; ``noise`` for seeded Gaussian noise).
Printed as a markdown table: median ms and the ratio to the fused forward.

- fused forward: ``model.forward_features`` as the app runs it.
- ours: `capture` (each block's probabilities computed once, inside the forward, by
  the compiled kernel: head means kept, q and k kept for `.probs`/`.rows`, the full maps not
  written to memory) + the class-row rollout (a vector-matrix chain over the head means).
- ours + handed: the same, but every layer's full maps are also written and handed to an
  `EachLayer` reader (what mean attention distance uses).
- ours, PyTorch-ops path: ``EXPLORER_NATIVE=0``, what runs where the kernel cannot be built.
- ours, stored: the same forward, but every layer's (1, H, N, N) map kept (cloned) and the
  rollout run on them: the design we did not choose, measured to justify on-demand.
- ``timm.utils.AttentionExtract`` (fx and hook) on a copy built with fused attention off
  (with it on, extraction silently returns nothing): maps only.
- Hugging Face ``Dinov2Model`` (same size, random weights), eager, ``output_attentions``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable

import timm
import torch
from timm.utils import AttentionExtract

from explorer.attention import VIEWS, EachLayer, QueryKeys, attention_rollout, capture
from explorer.bench.machine import describe
from explorer.images import EXAMPLES_DIR, load_image, prepare_pixels
from explorer.models import load_vit


def _eager_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy built with fused attention off, as AttentionExtract needs."""
    timm.layers.set_fused_attn(False)
    try:
        eager = timm.create_model("vit_small_patch14_dinov2", pretrained=False,
                                  dynamic_img_size=True)
    finally:
        timm.layers.set_fused_attn(True)
    eager.load_state_dict(model.state_dict())
    assert not any(blk.attn.fused_attn for blk in eager.blocks)
    return eager.eval()


def _hf_dinov2(size: int) -> torch.nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                       patch_size=14, image_size=size)
    # Dinov2Model(cfg, attn_implementation=...) raises TypeError in transformers 5.x.
    return Dinov2Model._from_config(cfg, attn_implementation="eager").eval()


@contextlib.contextmanager
def _native_off():
    """The capture without the compiled kernel (what runs where no C++ compiler exists)."""
    before = os.environ.get("EXPLORER_NATIVE")
    os.environ["EXPLORER_NATIVE"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["EXPLORER_NATIVE"]
        else:
            os.environ["EXPLORER_NATIVE"] = before


def variants(model: torch.nn.Module, size: int) -> dict[str, Callable[[torch.Tensor], int]]:
    """name -> function of pixels returning how many attention maps it produced."""
    eager = _eager_copy(model)
    extract_fx = AttentionExtract(eager, method="fx")
    extract_hook = AttentionExtract(eager, method="hook")
    hf = _hf_dinov2(size)

    def fused(x):
        model.forward_features(x)
        return 0

    def ours(x):
        maps = capture(model, x)
        rollout = attention_rollout(maps, rows=[0])  # computes each layer's probs once
        assert rollout.shape[-2] == 1
        return maps.num_layers

    def ours_handed(x):
        seen = []
        maps = capture(model, x, [*VIEWS, EachLayer(lambda layer, _p: seen.append(layer))])
        attention_rollout(maps, rows=[0])
        return len(seen)

    def ours_torch_ops(x):
        with _native_off():
            return ours(x)

    def ours_stored(x):
        kept = []
        capture(model, x, [QueryKeys(), EachLayer(lambda _l, p: kept.append(p.clone()))])
        attention_rollout(kept, rows=[0])
        return len(kept)

    def timm_fx(x):
        return len(extract_fx(x))

    def timm_hook(x):
        return len(extract_hook(x))

    def hf_eager(x):
        return len(hf(pixel_values=x, output_attentions=True).attentions)

    return {
        "timm fused forward (no maps)": fused,
        "**ours**: `capture` + every layer's probs once + class-row rollout": ours,
        "ours + every layer's full (1, H, N, N) maps handed to `EachLayer` once": ours_handed,
        "ours, PyTorch-ops path (no compiled kernel)": ours_torch_ops,
        "ours, stored variant: every layer's maps kept + rollout": ours_stored,
        "`timm.utils.AttentionExtract` fx, eager-built model (maps only)": timm_fx,
        "`AttentionExtract` hook, eager-built model (maps only)": timm_hook,
        "HF `Dinov2Model` eager, `output_attentions=True` (maps only)": hf_eager,
    }


def bench_input(kind: str, size: int, data_config: dict) -> torch.Tensor:
    """(1, 3, size, size): a bundled photo (what people look at) or seeded Gaussian noise.

    Noise is not a neutral choice: it makes the first layer's attention so peaked that 2.9% of
    its probabilities are denormal floats (vs <= 0.09% on the bundled photos at 518 px), and
    every CPU operation that reads or writes them (softmax, head mean, P @ v) runs several
    times slower; PyTorch's fused kernel never writes P and is not affected.
    """
    if kind == "noise":
        torch.manual_seed(0)
        return torch.randn(1, 3, size, size)
    image = load_image(EXAMPLES_DIR / f"{kind}.jpg").image
    return prepare_pixels(image, data_config, (size, size))


def measure(size: int, repeats: int, kind: str = "astronaut"
            ) -> list[tuple[str, float, float, float, int]]:
    """Interleaved timings at one size: (name, median wall ms, min wall ms, median CPU ms, maps).

    CPU ms is this process's CPU time (all threads): on a machine shared with other jobs it
    counts the work done rather than the time spent waiting for a core.
    """
    model, data_config = load_vit(None)
    runs = variants(model, size)
    x = bench_input(kind, size, data_config)
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    counts: dict[str, int] = {}
    with torch.no_grad():
        for name, fn in runs.items():  # warm-up, and every variant must produce 12 maps
            counts[name] = fn(x)
        names = list(runs)
        for r in range(repeats):  # rotate the order each round: no variant always runs first
            for name in names[r % len(names):] + names[: r % len(names)]:
                fn = runs[name]
                start, start_cpu = time.perf_counter(), time.process_time()
                fn(x)
                wall[name].append((time.perf_counter() - start) * 1e3)
                cpu[name].append((time.process_time() - start_cpu) * 1e3)
    return [(n, statistics.median(wall[n]), min(wall[n]), statistics.median(cpu[n]), counts[n])
            for n in runs]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m explorer.bench attention")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 518])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--input", default="astronaut",
                        help="a bundled photo (astronaut, chelsea, coffee, rocket) or 'noise'")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"# Attention maps, DINOv2 ViT-S/14, batch 1, fp32, {torch.get_num_threads()} threads")
    print(f"CPU: {describe()}; torch {torch.__version__}, "
          f"timm {timm.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print(f"input: {args.input}")
    results = {size: measure(size, args.repeats, args.input) for size in args.sizes}
    print(f"load average after: {os.getloadavg()[0]:.2f}\n")

    cells = " | ".join(f"{s} px wall ms (×) | {s} px CPU ms (×)" for s in args.sizes)
    print(f"| variant | {cells} | maps |")
    print("|---" * (2 * len(args.sizes) + 2) + "|")
    for i, name in enumerate(r[0] for r in results[args.sizes[0]]):
        row = []
        for size in args.sizes:
            _, base_wall, _, base_cpu, _ = results[size][0]
            _, med, best, cpu, _ = results[size][i]
            row.append(f"{med:.0f} (min {best:.0f}) **{med / base_wall:.2f}×**")
            row.append(f"{cpu:.0f} **{cpu / base_cpu:.2f}×**")
        print(f"| {name} | " + " | ".join(row) + f" | {results[args.sizes[0]][i][4]} |")
    print(f"\nmedians of {args.repeats} interleaved rounds (order rotated each round) after one "
          "warm-up round; "
          "CPU = process CPU time, all threads.")
