"""Small analyses of captured maps: query maps, DINO-style masks, prefix shares, token norms."""

from __future__ import annotations

import torch

from explorer.attention.maps import AttentionMaps


def query_maps(maps: AttentionMaps, layer: int, query: int) -> torch.Tensor:
    """One query token's attention over the patches, per head, as images.

    Returns:
        (B, heads, rows, cols).
    """
    r = maps.rows(layer, [query])[:, :, 0, maps.num_prefix_tokens :]
    return r.reshape(*r.shape[:-1], *maps.grid)


def class_token_maps(maps: AttentionMaps, layer: int) -> torch.Tensor:
    """The class token's attention over the patches per head; what DINO visualises.

    Models without a class token (average-pooled, with or without registers) get the
    attention each patch receives, averaged over all patch queries, instead.

    Returns:
        (B, heads, rows, cols).
    """
    if maps.has_class_token:
        return query_maps(maps, layer, 0)  # timm puts the class token first
    p = maps.num_prefix_tokens
    received = maps.probs(layer)[:, :, p:, p:].mean(dim=2)
    return received.reshape(*received.shape[:-1], *maps.grid)


def query_maps_all_layers(maps: AttentionMaps, query: int) -> torch.Tensor:
    """One query token's attention over the patches in every layer (cheap: rows only).

    Returns:
        (L, B, heads, rows, cols).
    """
    return torch.stack([query_maps(maps, layer, query) for layer in range(maps.num_layers)])


def mass_mask(weights: torch.Tensor, keep: float = 0.6) -> torch.Tensor:
    """DINO-style mask: the largest weights that together hold ``keep`` of the total mass.

    Args:
        weights: (..., n) non-negative weights (e.g. class-token attention to patches).
        keep: share of the mass to keep, in (0, 1].

    Returns:
        (..., n) bool mask (at least one True per row).
    """
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], not {keep}.")
    values, order = weights.sort(dim=-1, descending=True)
    total = values.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    before = (values.cumsum(dim=-1) - values) / total  # the mass ahead of each weight
    kept_sorted = before < keep  # a weight is kept if the mass before it is still short
    return torch.zeros_like(kept_sorted).scatter(-1, order, kept_sorted)


def prefix_attention_share(maps: AttentionMaps) -> torch.Tensor:
    """Per layer, the share of the patches' attention that goes to each prefix token.

    Averaged over heads and over patch queries (the prefix tokens' own rows are left out).

    Returns:
        (L, B, num_prefix_tokens); the rest of each row, up to 1, goes to patches.
    """
    p = maps.num_prefix_tokens
    out = maps.token_norms.new_zeros(maps.num_layers, maps.batch_size, p)
    if p == 0:
        return out
    if maps.head_mean is not None:  # the mean over heads is kept: no map to recompute
        for layer, a in enumerate(maps.head_mean):
            out[layer] = a[:, p:, :p].to(out.dtype).mean(dim=1)
        return out
    for layer, a in maps.iter_probs():
        out[layer] = a[:, :, p:, :p].mean(dim=(1, 2))
    return out


def high_norm_tokens(
    norms: torch.Tensor, num_prefix_tokens: int, factor: float = 2.0
) -> torch.Tensor:
    """Patch tokens whose norm stands out: the "artifact" tokens of Darcet et al. (2024).

    DINOv2 without registers repurposes a few low-information patches as global scratch
    space; their output norm is several times the typical patch's. A patch counts as high
    norm when its norm exceeds ``factor`` x the median patch norm of its image.

    Args:
        norms: (..., N) token norms (e.g. ``maps.token_norms[-1]``).

    Returns:
        (..., rows*cols) bool over patch tokens.
    """
    patch = norms[..., num_prefix_tokens:]
    return patch > factor * patch.median(dim=-1, keepdim=True).values
