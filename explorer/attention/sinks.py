"""Attention sinks: tokens that take an outsized share of every query's attention.

A trained transformer often parks attention it does not need on a few tokens (Xiao et al.
2023, "Efficient Streaming Language Models with Attention Sinks"; Darcet et al. 2024,
"Vision Transformers Need Registers"). Such a token need not have a high norm, so
`high_norm_tokens` can miss it; what marks it is the attention it *receives*. Rollout
multiplies each block's attention through the stack, so a sink in an early block can become
the brightest patch of a rollout map without saying anything about the object.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SINK_FACTOR = 10.0  # a sink receives at least this many times the uniform share 1/N


@dataclass(frozen=True)
class Sink:
    """One token that takes an outsized share of a block's attention.

    Attributes:
        token: its index in the sequence (prefix tokens first, then patches row-major).
        share: the mean over queries of the attention it receives (heads averaged).
        least: the smallest share any query gives it (how universal the habit is).
        queries: the share of queries that give it at least ``SINK_FACTOR`` x 1/N.
    """

    token: int
    share: float
    least: float
    queries: float


def attention_sinks(attn: torch.Tensor, factor: float = SINK_FACTOR) -> list[Sink]:
    """Tokens whose mean received attention is at least ``factor`` x the uniform share 1/N.

    Args:
        attn: (N, N) row-stochastic attention of one block, or (H, N, N) (heads averaged).
        factor: how many times the uniform share makes a sink.

    Returns:
        The sinks, largest share first (possibly none).
    """
    if attn.dim() == 3:
        attn = attn.mean(dim=0)
    if attn.dim() != 2 or attn.shape[0] != attn.shape[1]:
        raise ValueError(f"Expected (N, N) or (H, N, N) attention, got {tuple(attn.shape)}.")
    attn = attn.float()
    n = attn.shape[-1]
    received = attn.mean(dim=0)  # (N,) mean over queries of each key's share
    floor = factor / n
    order = torch.argsort(received, descending=True)
    return [Sink(token=int(t), share=float(received[t]), least=float(attn[:, t].min()),
                 queries=float((attn[:, t] >= floor).float().mean()))
            for t in order.tolist() if received[t] >= floor]


def patch_sinks(attn: torch.Tensor, num_prefix_tokens: int,
                factor: float = SINK_FACTOR) -> list[Sink]:
    """`attention_sinks` among the patches only (prefix tokens, e.g. the class token, are
    expected to gather attention; a patch that does is the surprise)."""
    return [s for s in attention_sinks(attn, factor) if s.token >= num_prefix_tokens]
