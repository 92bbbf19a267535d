"""Hand-built iGPT models for tests: their predictions are known exactly."""

from __future__ import annotations

import math

import torch
from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

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


def tiny_hf(seed: int = 0, std: float = 0.3) -> ImageGPTForCausalImageModeling:
    """A 2-layer ImageGPT with 16 colours + start token, 6×6 images; large random weights (LN
    gains included) so every part of the network matters and greedy choices are clear-cut
    (no near-ties that rounding could flip)."""
    torch.manual_seed(seed)
    cfg = ImageGPTConfig(vocab_size=17, n_positions=36, n_embd=32, n_layer=2, n_head=4,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = ImageGPTForCausalImageModeling._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, std)
    return hf
