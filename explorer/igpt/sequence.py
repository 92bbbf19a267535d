"""Pixels as words: the raster-order token sequence that iGPT reads, and back."""

from __future__ import annotations

import torch


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


def attention_cost(height: int, width: int) -> dict:
    """The lecture's quadratic-cost point: sequence length and attention-matrix entries.

    Returns {"pixels": H*W, "seq_len": H*W (+1 with the start token), "attn_entries": L^2
    per head per layer, "attn_mb": fp32 MB for one head of one layer}.
    """
    L = height * width
    return {"size": f"{height}×{width}", "pixels": L, "seq_len": L + 1,
            "attn_entries": (L + 1) ** 2, "attn_mb": (L + 1) ** 2 * 4 / 1e6}
