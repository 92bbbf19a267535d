"""Pixels as words: the raster-order token sequence that iGPT reads, and back."""

from __future__ import annotations

import torch

from explorer import patches


def raster(tokens: torch.Tensor) -> torch.Tensor:
    """(..., H, W) -> (..., H*W): row by row, left to right (pixel (r, c) at r * W + c)."""
    return tokens.flatten(-2)


def unraster(seq: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(..., H*W) -> (..., H, W), the inverse of `raster`."""
    return seq.unflatten(-1, (height, width))


def with_start(seq: torch.Tensor, start_token: int) -> torch.Tensor:
    """(B, L) -> (B, 1 + L): the start token first, as iGPT's input begins."""
    start = seq.new_full((*seq.shape[:-1], 1), start_token)
    return torch.cat([start, seq], dim=-1)


def model_inputs(tokens: torch.Tensor, start_token: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-pixel training pair from images of tokens.

    tokens: (B, H, W) -> inputs (B, L) = [start, p_0 .. p_{L-2}] and targets (B, L) =
    [p_0 .. p_{L-1}], L = H*W.
    """
    seq = raster(tokens)
    return with_start(seq[..., :-1], start_token), seq


def prefix_len(rows_kept: int, width: int) -> int:
    """Number of pixel tokens given when the top `rows_kept` rows are kept."""
    return rows_kept * width


def attention_cost(height: int, width: int, embed_dim: int) -> dict:
    """The lecture's quadratic-cost point for an image of height x width pixels read by iGPT.

    The sequence is one token per pixel after the start token; its cost comes from
    `explorer.patches.attention_cost`, the one place self-attention cost is computed.

    Args:
        embed_dim: the model's width (channels per token), for the FLOP count.

    Returns:
        {"size": "H×W", "pixels": H*W, "seq_len": L = H*W + 1, "attn_entries": L² per head
        per layer, "attn_mb": fp32 MB of one head's matrix in one layer, "attn_flops": QKᵀ
        and attention @ V of one layer, all heads}.
    """
    pixels = height * width
    cost = patches.attention_cost(pixels + 1, embed_dim)  # + the start token
    return {"size": f"{height}×{width}", "pixels": pixels, "seq_len": cost.tokens,
            "attn_entries": cost.attention_entries, "attn_mb": cost.attention_bytes / 1e6,
            "attn_flops": cost.attention_flops}
