"""Hand-built iGPT models for tests: their predictions are known exactly."""

from __future__ import annotations

import math

import torch

from explorer.igpt.model import IGPTConfig, ImageGPT


def known_distribution_model(probs: torch.Tensor) -> ImageGPT:
    """A model whose next-colour distribution is `probs` at every position: blocks output
    zero (residual identity), the input is the constant e_0 from the position embedding, ln_f
    scales it to sqrt(C) e_0, and the head's column 0 holds log p / sqrt(C)."""
    C = 8
    m = ImageGPT(IGPTConfig(vocab_size=len(probs) + 1, n_positions=16, n_embd=C, n_layer=1,
                            n_head=1, layer_norm_epsilon=1e-12))
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.transformer.ln_f.weight.fill_(1.0)
        m.transformer.wpe.weight[:, 0] = 1.0
        m.lm_head.weight[:, 0] = probs.log() / math.sqrt(C)
    return m.eval()
