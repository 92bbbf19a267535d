"""iGPT sampler: our KV-cache sampler vs transformers' `generate`, against the bandwidth floor.

`python -m explorer.bench igpt [--models offline,igpt-s] [--batch 4] [--reps 2]`

Task: complete the bottom half of a 28×28 image (keep 14 rows = 392 tokens, generate 392),
`--batch` samples at once, top-k 40 sampling, fp32 on the CPU. For each model:

- tokens/s of our sampler and of `ImageGPTForCausalImageModeling.generate` on the same weights
  (same prefix, same number of new tokens), runs interleaved;
- our ms per decode step against the memory-bandwidth floor: the bytes one step must read
  (every weight matrix once + the key/value cache up to the current position, averaged over
  the generated positions) divided by the read bandwidth measured in the same run;
- the wall time of the whole completion (prefill included).

Each model runs twice: as is (fp32, token-for-token `generate`'s equal under greedy decoding)
and as `explorer.igpt.fast.fast_decoder` (int8 weights, bfloat16 key/value cache), whose
floor counts the bytes it reads (1 per weight, 2 per cached value). `--quality N` also scores
N Fashion-MNIST test images with the offline model through the decode path, fp32 and fast
(bits/dim), to show what the fast decoder changes in the predictions.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from explorer.bench.machine import describe
from explorer.igpt.fast import fast_decoder
from explorer.igpt.model import IGPTConfig, ImageGPT
from explorer.igpt.sampler import SampleConfig, complete_stream
from explorer.igpt.sequence import with_start

SIDE = 28
KEEP_ROWS = 14
TOP_K = 40


def read_bandwidth_gbs(mb: int = 512, reps: int = 5) -> float:
    """Best read bandwidth (GB/s) of summing a large fp32 tensor (bigger than any cache)."""
    x = torch.ones(mb * 2**20 // 4)
    x.sum()  # touch the pages
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def step_bytes(cfg: IGPTConfig, batch: int, prefix: int, length: int,
               weight_bytes: int = 4, kv_bytes: int = 4) -> tuple[float, float]:
    """(weight bytes, mean KV-cache bytes) one decode step reads (fp32: 4 and 4).

    Weights: every block matrix and vector plus the head; of the embeddings only one row each.
    KV: keys and values of every layer for positions 0..t, averaged over generated steps t.
    """
    C, inner = cfg.n_embd, cfg.n_inner or 4 * cfg.n_embd
    per_layer = (C * 3 * C + 3 * C) + (C * C + C) + (C * inner + inner) + (inner * C + C) + 2 * C
    weights = weight_bytes * (cfg.n_layer * per_layer + C + cfg.n_colors * C + 2 * C)
    mean_pos = statistics.mean(range(prefix + 1, length + 1))  # keys attended at each step
    kv = kv_bytes * cfg.n_layer * 2 * batch * mean_pos * C
    return weights, kv


def time_ours(model: ImageGPT, prefix: torch.Tensor, length: int) -> tuple[float, float]:
    """(total seconds, median seconds per decode step) for one completion."""
    cfg = SampleConfig(top_k=TOP_K, seed=0)
    t0 = time.perf_counter()
    marks = [time.perf_counter() - t0 for _ in complete_stream(model, prefix, length, cfg)]
    total = time.perf_counter() - t0
    steps = [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]
    return total, statistics.median(steps)


@torch.inference_mode()
def time_generate(hf, prefix: torch.Tensor, length: int, start: int) -> float:
    """Seconds for transformers' `generate` (KV cache on) to add the same tokens."""
    ids = with_start(prefix, start)
    new = length - prefix.shape[1]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                      top_k=TOP_K, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    elapsed = time.perf_counter() - t0
    assert out.shape[1] == length + 1
    return elapsed


def print_quality(n: int) -> None:
    """Bits/dim of the offline model on n test images through the decode path, fp32 vs fast."""
    from explorer import datasets
    from explorer.igpt.checkpoint import ASSET_DIR, load_local
    from explorer.igpt.likelihood import bits_per_dim, pixel_nll_bits_decoding
    from explorer.igpt.pipeline import image_tokens

    m = load_local(ASSET_DIR)
    subset = datasets.fashion_mnist("test", n=n)
    tokens = torch.stack([image_tokens(subset.image(i), m)[1] for i in range(len(subset))])
    print(f"\nOffline model, {len(subset)} Fashion-MNIST test images, scored through the "
          "decode path (one token per step, cached):\n")
    print("| decoder | bits/dim | s |")
    print("|---|---|---|")
    for name, model in (("fp32 (exact)", m.model), ("int8 W + bf16 KV", fast_decoder(m.model))):
        t0 = time.perf_counter()
        bpd = bits_per_dim(pixel_nll_bits_decoding(model, tokens), m.channels)
        print(f"| {name} | {bpd:.4f} | {time.perf_counter() - t0:.0f} |", flush=True)


def build_models(names: list[str]) -> list[tuple[str, ImageGPT]]:
    out = []
    for name in names:
        if name == "offline":
            from explorer.igpt.checkpoint import ASSET_DIR, load_local

            out.append(("offline (assets/igpt)", load_local(ASSET_DIR).model))
        elif name == "igpt-s":
            torch.manual_seed(0)
            cfg = IGPTConfig(vocab_size=513, n_positions=SIDE * SIDE, n_embd=512, n_layer=24,
                             n_head=8)
            out.append(("iGPT-S size, random (24×512)", ImageGPT(cfg).eval()))
        else:
            raise SystemExit(f"unknown model {name!r}: use offline, igpt-s")
    return out


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m explorer.bench igpt", description=__doc__)
    p.add_argument("--models", default="offline,igpt-s")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=2, help="interleaved repetitions (best is kept)")
    p.add_argument("--generate-reps", type=int, default=1,
                   help="repetitions of transformers' generate (slow for iGPT-S)")
    p.add_argument("--quality", type=int, default=0, metavar="N",
                   help="also score N Fashion-MNIST test images, fp32 vs fast decoder")
    args = p.parse_args(argv)

    length, keep = SIDE * SIDE, KEEP_ROWS * SIDE
    bw = read_bandwidth_gbs()
    print(f"# iGPT sampler: {args.batch} completions of the bottom half of a {SIDE}×{SIDE} "
          f"image ({length - keep} new tokens), top-k {TOP_K}, fp32, "
          f"{torch.get_num_threads()} threads, {describe()}")
    print(f"measured read bandwidth: {bw:.1f} GB/s\n")
    head = ("model", "decoder", "params", "ours tok/s", "generate tok/s", "speed-up",
            "ours ms/step", "generate ms/step", "MB read/step (W+KV)", "floor ms/step",
            "ours / floor", "ours / fp32 floor", "ours total s")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head), flush=True)
    for label, model in build_models(args.models.split(",")):
        cfg = model.config
        hf = model.to_hf()
        fast = fast_decoder(model)
        prefix = torch.randint(0, cfg.n_colors, (args.batch, keep),
                               generator=torch.Generator().manual_seed(0))
        decoders = {"fp32 (exact)": (model, 4, 4), "int8 W + bf16 KV": (fast, 1, 2)}
        for dec, _, _ in decoders.values():
            time_ours(dec, prefix[:, :8], 16)  # warm-up (kernels, allocator)
        ours: dict[str, list] = {name: [] for name in decoders}
        gen = []
        for r in range(max(args.reps, args.generate_reps)):  # interleaved
            if r < args.reps:
                for name, (dec, _, _) in decoders.items():
                    ours[name].append(time_ours(dec, prefix, length))
            if r < args.generate_reps:
                gen.append(time_generate(hf, prefix, length, cfg.start_token))
        gen_total = min(gen)
        new_tokens = (length - keep) * args.batch
        fp32_floor = sum(step_bytes(cfg, args.batch, keep, length)) / (bw * 1e9)
        for name, (_, wb, kvb) in decoders.items():
            total, step = min(ours[name])
            w, kv = step_bytes(cfg, args.batch, keep, length, wb, kvb)
            floor = (w + kv) / (bw * 1e9)
            row = (label, name, f"{model.num_params() / 1e6:.2f}M", f"{new_tokens / total:.0f}",
                   f"{new_tokens / gen_total:.0f}", f"{gen_total / total:.1f}×",
                   f"{step * 1e3:.2f}", f"{gen_total / (length - keep) * 1e3:.2f}",
                   f"{(w + kv) / 1e6:.1f}", f"{floor * 1e3:.2f}", f"{step / floor:.2f}×",
                   f"{step / fp32_floor:.2f}×", f"{total:.2f}")
            print("| " + " | ".join(row) + " |", flush=True)
        del hf, fast
    if args.quality:
        print_quality(args.quality)
    print(f"\nread bandwidth again at the end: {read_bandwidth_gbs():.1f} GB/s "
          "(differs from the start when other work shares the CPU)")
