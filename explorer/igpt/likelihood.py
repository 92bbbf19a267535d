"""How surprised the model is by each pixel of a real image: negative log-likelihood in bits."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from explorer.igpt.model import ImageGPT
from explorer.igpt.sequence import model_inputs


@torch.inference_mode()
def pixel_nll_bits(model: ImageGPT, tokens: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """tokens: (B, H, W) colour ids -> (B, H, W) bits, -log2 p(pixel | all pixels before it).

    One forward pass per batch: the start token plus pixels 0..L-2 go in, and position t's
    distribution scores pixel t (teacher forcing).
    """
    def nats(inputs, targets):
        return F.cross_entropy(model(inputs).transpose(1, 2), targets, reduction="none")

    return _bits(model, tokens, batch_size, nats)


def _bits(model: ImageGPT, tokens: torch.Tensor, batch_size: int, nats) -> torch.Tensor:
    """(B, H, W) tokens -> (B, H, W) bits, batch by batch; ``nats(inputs, targets)`` scores
    one batch's (b, L) inputs (start token first) against its (b, L) targets in nats."""
    out, device = [], model.transformer.wte.weight.device  # score where the model lives
    for chunk in tokens.split(batch_size):
        inputs, targets = model_inputs(chunk.to(device), model.config.start_token)  # (b, L), (b, L)
        out.append(nats(inputs, targets).view(chunk.shape) / math.log(2))
    return torch.cat(out)


def bits_per_dim(bits: torch.Tensor, channels: int = 1) -> float:
    """Mean bits per pixel divided by the channels each pixel stands for.

    bits: (..., H, W). channels: 1 for a grey palette, 3 for a colour palette (a token codes
    R, G and B together, so its bits are shared by three dimensions).
    """
    return float(bits.mean()) / channels


@torch.inference_mode()
def pixel_nll_bits_decoding(model: ImageGPT, tokens: torch.Tensor,
                            batch_size: int = 256) -> torch.Tensor:
    """Like `pixel_nll_bits`, but through the cached one-token-per-step path sampling uses.

    Scores the predictions the sampler actually draws from, so it measures what a faster
    decoder (`explorer.igpt.fast`: int8 weights, bfloat16 cache) changes. For an fp32 model it
    equals `pixel_nll_bits` up to float rounding.

    tokens: (B, H, W) -> (B, H, W) bits.
    """
    def nats(inputs, targets):
        b, L = inputs.shape
        caches = model.new_cache(b, L)
        nll = torch.empty(b, L, device=inputs.device)
        for t in range(L):
            logits = model(inputs[:, t:t + 1], caches, pos=t)[:, -1]  # (b, K)
            nll[:, t] = F.cross_entropy(logits.float(), targets[:, t], reduction="none")
        return nll

    return _bits(model, tokens, batch_size, nats)
