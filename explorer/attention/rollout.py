"""Head fusion and attention rollout (Abnar & Zuidema 2020)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from explorer.attention.maps import AttentionMaps

HEAD_FUSIONS = ("mean", "max", "min")


def fuse_heads(attn: torch.Tensor, how: str = "mean", dim: int = -3) -> torch.Tensor:
    """Combine heads: mean, max or min over ``dim`` (heads are dim -3 of (..., H, N, N))."""
    if how == "mean":
        return attn.mean(dim=dim)
    if how == "max":
        return attn.amax(dim=dim)
    if how == "min":
        return attn.amin(dim=dim)
    raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, not {how!r}.")


def _top_down(attn, start_layer: int) -> Iterator[torch.Tensor]:
    """Each layer's (..., H, N, N) attention from the top layer down to ``start_layer``."""
    if isinstance(attn, AttentionMaps):
        return (p for _, p in attn.iter_probs(range(attn.num_layers - 1, start_layer - 1, -1)))
    if isinstance(attn, torch.Tensor) and attn.dim() < 4:
        raise ValueError(f"Expected (L, [B,] H, N, N) attention, got {tuple(attn.shape)}.")
    return (attn[i] for i in range(len(attn) - 1, start_layer - 1, -1))


def mask_keys(fused: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    """(..., N, N) attention with the columns of ``tokens`` set to 0 and every row
    renormalised: the attention as if those keys were not there (e.g. attention sinks)."""
    if not tokens:
        return fused
    fused = fused.clone()
    fused[..., list(tokens)] = 0
    return fused / fused.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(fused.dtype).tiny)


def _rollout_step(a: torch.Tensor, head_fusion: str, discard_ratio: float,
                  masked: Sequence[int] = ()) -> torch.Tensor:
    """One layer of rollout: fuse heads, mask keys, drop the weakest links, add identity,
    renormalise.

    Args:
        a: (..., H, N, N) attention of one layer.
        masked: keys taken out first (`mask_keys`).

    Returns:
        (..., N, N) row-stochastic matrix 0.5 (A + I), rows renormalised.
    """
    fused = mask_keys(fuse_heads(a, head_fusion), masked)
    if discard_ratio > 0:
        # As in Abnar & Zuidema's reference code: per image, zero the smallest weights of
        # the whole matrix (the identity below keeps every row non-empty).
        flat = fused.flatten(-2)
        k = int(flat.shape[-1] * discard_ratio)
        if k:
            low = flat.topk(k, dim=-1, largest=False).indices
            flat = flat.scatter(-1, low, 0.0)
        fused = flat.view_as(fused)
    eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
    fused = 0.5 * (fused + eye)
    # keepdim: divide each row by its own sum (without it, the (N,) sums broadcast over
    # columns and rows stop summing to 1: the bug of the best-known implementation).
    return fused / fused.sum(dim=-1, keepdim=True)


def _eye_rows(n: int, rows: Sequence[int] | None, like: torch.Tensor) -> torch.Tensor:
    """The identity's rows (all, or those asked for) on ``like``'s device and dtype."""
    eye = torch.eye(n, dtype=like.dtype, device=like.device)
    if rows is None:
        return eye
    return eye.index_select(0, torch.as_tensor(list(rows), dtype=torch.long, device=like.device))


def attention_rollout(
    attn,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    start_layer: int = 0,
    rows: Sequence[int] | None = None,
    masked: Sequence[int] = (),
) -> torch.Tensor:
    """Attention rollout: how much each token's final state traces back to each token.

    ``R = Â_{L-1} ... Â_{start}`` where ``Â = rownorm(0.5 (fuse_heads(A) + I))``; the
    identity accounts for the residual connection. Every row of the result sums to 1 for
    every setting.

    Args:
        attn: `AttentionMaps` (layers computed one at a time), or a tensor / sequence of
            per-layer attention shaped (L, [B,] H, N, N).
        head_fusion: "mean", "max" or "min" over heads.
        discard_ratio: share of the smallest fused weights per layer set to 0 (0 <= r < 1).
        start_layer: first block included (earlier blocks are skipped).
        rows: only these query rows (e.g. ``[0]`` for the class token): computed as a
            vector-matrix chain from the top layer down, never forming N x N products.
        masked: tokens taken out of every layer's fused attention before the identity is
            added (`mask_keys`: their columns zeroed, rows renormalised), e.g. attention
            sinks, so the map shows what the other tokens carry.

    Returns:
        (..., N, N), or (..., len(rows), N) with ``rows``; "..." is the batch dims of the
        input ((B,) for `AttentionMaps` and (L, B, H, N, N) tensors, none for (L, H, N, N)).
    """
    if not 0 <= discard_ratio < 1:
        raise ValueError(f"discard_ratio must be in [0, 1), not {discard_ratio}.")
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, not {head_fusion!r}.")
    L = attn.num_layers if isinstance(attn, AttentionMaps) else len(attn)
    if not 0 <= start_layer < L:
        raise ValueError(f"start_layer must be in [0, {L - 1}], not {start_layer}.")
    plain = head_fusion == "mean" and discard_ratio == 0
    if isinstance(attn, AttentionMaps) and attn.head_mean is not None and plain:
        # Kept head means: 0.5 (mean_h A_h + I) has rows summing to 1 already.
        means = attn.head_mean[start_layer:]
        result = _eye_rows(attn.num_tokens, rows, attn.token_norms).expand(attn.batch_size, -1, -1)
        for m in reversed(means):
            m = mask_keys(m.to(result.dtype), masked)  # kept maps may be compact
            result = 0.5 * (result @ m + result)
        return result
    plain = plain and not masked
    result = None
    for a in _top_down(attn, start_layer):
        if result is None:  # top layer: start from its rows (or the identity's rows)
            eye = _eye_rows(a.shape[-1], rows, a)
            result = eye.expand(*a.shape[:-3], *eye.shape).clone()
        if rows is not None and plain:
            # Fast path: r (0.5 (mean_h A_h + I)) = 0.5 (mean_h (r A_h) + r); no fused copy.
            result = 0.5 * (torch.matmul(result.unsqueeze(-3), a).mean(dim=-3) + result)
        else:
            result = result @ _rollout_step(a, head_fusion, discard_ratio, masked)
    return result


def cls_rollout_map(maps: AttentionMaps, **kwargs) -> torch.Tensor:
    """The class token's rollout over the patches, as an image-shaped map.

    Args:
        maps: from a model with a class token (`AttentionMaps.has_class_token`).
        **kwargs: `attention_rollout`'s settings.

    Returns:
        (B, rows, cols): how much of the class token's final state traces back to each patch
        (excluding the prefix tokens' own share, so values need not sum to 1).
    """
    if not maps.has_class_token:
        raise ValueError("This model has no class token: use patch_rollout_map.")
    r = attention_rollout(maps, rows=[0], **kwargs)[..., 0, maps.num_prefix_tokens :]
    return r.reshape(*r.shape[:-1], *maps.grid)


def patch_rollout_map(maps: AttentionMaps, **kwargs) -> torch.Tensor:
    """The patch queries' mean rollout over the patches: the map of models without a class
    token (average-pooled; their prefix tokens, if any, are registers).

    Returns:
        (B, rows, cols).
    """
    p = maps.num_prefix_tokens
    r = attention_rollout(maps, rows=range(p, maps.num_tokens), **kwargs)[..., p:].mean(dim=-2)
    return r.reshape(*r.shape[:-1], *maps.grid)
