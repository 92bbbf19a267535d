"""Complete images pixel by pixel with a preallocated key/value cache.

The top rows are given (the prefix); the model fills in the rest in raster order, for a batch
of samples at once. Each step runs one token per sample through the model and writes its
keys/values in place into a cache allocated once for the whole sequence, so a step reads the
weights plus the cache and copies nothing else (transformers' `generate` grows its cache
with `torch.cat` every step). Several completions of one image share their known pixels: they
are run through the model once, and every step reads their keys/values once for the whole
batch (`SharedPrefixKV`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from explorer.igpt.model import ImageGPT
from explorer.igpt.sequence import with_start


@dataclass
class SampleConfig:
    """How to pick each next colour from the model's distribution."""

    temperature: float = 1.0  # divides the logits; < 1 sharper, > 1 flatter
    top_k: int = 0  # keep only the k most likely colours; 0 = all
    top_p: float = 1.0  # keep the smallest set of colours whose probability reaches p; 1 = all
    greedy: bool = False  # always the most likely colour (ignores the three above)
    seed: int | None = 0  # random seed for reproducible samples; None = fresh randomness

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (got {self.temperature})")
        if self.top_k < 0:
            raise ValueError(f"top-k must be 0 (off) or a positive count (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1] (got {self.top_p})")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(B, V) logits -> (B, V) with the excluded colours set to -inf.

    top_k keeps the k largest (ties at the k-th value are kept); top_p keeps the most likely
    colours until their cumulative probability reaches top_p (the one that crosses it included).
    """
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a colour if the ones before it already reach top_p (the first is always kept)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_next(logits: torch.Tensor, cfg: SampleConfig,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids, by `cfg`."""
    if cfg.greedy:
        return logits.argmax(-1)
    logits = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def shares_prefix(model: ImageGPT, prefix: torch.Tensor) -> bool:
    """Whether a batch can decode against one shared prefill (`SharedPrefixKV`): several
    samples, the same known pixels in each, and a cache in the weights' own dtype."""
    return (prefix.shape[0] > 1 and prefix.shape[1] > 0 and model.kv_dtype is None
            and bool((prefix == prefix[:1]).all()))


@torch.inference_mode()
def complete_stream(model: ImageGPT, prefix: torch.Tensor, length: int,
                    cfg: SampleConfig | None = None) -> Iterator[torch.Tensor]:
    """Fill in pixels prefix.shape[1] .. length - 1 of each sequence, one pixel per step.

    Args:
        model: an `ImageGPT` in eval mode.
        prefix: (B, P) known pixel tokens in raster order (no start token); P may be 0.
        length: total pixels L = H * W (L <= model.config.n_positions).
        cfg: sampling settings.

    Yields:
        (B, L) int64 tokens after every new pixel (the same tensor, filled in place; pixels
        not yet generated are 0). The last yield is the finished completion.
    """
    cfg = cfg or SampleConfig()
    prefix = prefix.to(model.transformer.wte.weight.device)  # sample where the model lives
    B, P = prefix.shape
    if not 0 <= P < length <= model.config.n_positions:
        raise ValueError(f"need 0 <= prefix ({P}) < length ({length}) <= n_positions")
    gen = None
    if cfg.seed is not None and not cfg.greedy:
        gen = torch.Generator(device=prefix.device).manual_seed(int(cfg.seed))
    out = prefix.new_zeros(B, length)
    out[:, :P] = prefix
    start = model.config.start_token
    if shares_prefix(model, prefix):  # n completions of one image: prefill once, share it
        prefill = model.new_cache(1, P + 1)
        logits = model(with_start(prefix[:1], start), prefill, pos=0)[:, -1].expand(B, -1)
        caches = model.shared_prefix_cache(prefill, B, length)
    else:
        caches = model.new_cache(B, length)
        # prefill: the start token and the known pixels in one pass; the last predicts P
        logits = model(with_start(prefix, start), caches, pos=0)[:, -1]
    for t in range(P, length):
        out[:, t] = pick_next(logits, cfg, gen)
        yield out
        if t + 1 < length:  # pixel t is the input at position t + 1 (start is position 0)
            logits = model(out[:, t:t + 1], caches, pos=t + 1)[:, -1]


def complete(model: ImageGPT, prefix: torch.Tensor, length: int,
             cfg: SampleConfig | None = None) -> torch.Tensor:
    """Like `complete_stream` but returns only the finished (B, L) tokens."""
    out = prefix
    for filled in complete_stream(model, prefix, length, cfg):
        out = filled
    return out.clone()
