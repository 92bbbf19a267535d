"""The attention tab's view model: every view of one screen, for image 0 (no gradio here).

Built from `explorer.attention` results by pure functions; the tab turns them into images
and figures (`explorer.plots.attention`). Tensors stay on the maps' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from explorer.attention import (
    AttentionMaps,
    class_token_maps,
    cls_rollout_map,
    fuse_heads,
    mass_mask,
    patch_rollout_map,
    prefix_attention_share,
    query_maps_all_layers,
)


@dataclass
class AttentionViews:
    """The data behind the attention tab's views for image 0 of `AttentionMaps`.

    Attributes:
        layer: the chosen block (0-based).
        heads: (H, rows, cols) class-token attention of each head in ``layer`` (for models
            without a class token: the attention each patch receives).
        fused: (rows, cols) the same, fused over heads.
        per_layer: (L, rows, cols) the fused map of every layer.
        rollout: (rows, cols) class-token rollout over the patches (models without a class
            token: the patch queries' mean rollout).
        masks: (H, rows, cols) bool, DINO-style: patches holding ``keep`` of each head's mass.
        norms: (N,) token norms after block ``layer`` (prefix tokens first).
        high_norm: (rows*cols,) bool, patches above ``norm_factor`` x the median patch norm.
        norm_threshold: that threshold, a 0-dim tensor (formats like a float).
        prefix_share: (L, P) share of patch queries' attention to each prefix token.
    """

    layer: int
    heads: torch.Tensor
    fused: torch.Tensor
    per_layer: torch.Tensor
    rollout: torch.Tensor
    masks: torch.Tensor
    norms: torch.Tensor
    high_norm: torch.Tensor
    norm_threshold: torch.Tensor
    prefix_share: torch.Tensor


def attention_views(
    maps: AttentionMaps,
    layer: int,
    head_fusion: str = "mean",
    rollout_fusion: str = "mean",
    discard_ratio: float = 0.0,
    start_layer: int = 0,
    keep: float = 0.6,
    norm_factor: float = 2.0,
    prefix_share: torch.Tensor | None = None,
) -> AttentionViews:
    """Compute every view of the tab for image 0 (pass ``prefix_share`` to reuse it)."""
    if not 0 <= layer < maps.num_layers:
        raise ValueError(f"layer must be in [0, {maps.num_layers - 1}], not {layer}.")
    heads = class_token_maps(maps, layer)[0]
    per_layer = torch.stack([fuse_heads(class_token_maps(maps, i)[0], head_fusion)
                             for i in range(maps.num_layers)])
    rollout_map = cls_rollout_map if maps.has_class_token else patch_rollout_map
    rollout = rollout_map(maps, head_fusion=rollout_fusion, discard_ratio=discard_ratio,
                          start_layer=start_layer)[0]
    masks = mass_mask(heads.flatten(-2), keep).reshape(heads.shape)
    norms = maps.token_norms[layer, 0]
    patch_norms = norms[maps.num_prefix_tokens :]
    threshold = norm_factor * patch_norms.median()
    if prefix_share is None:
        prefix_share = prefix_attention_share(maps)[:, 0]
    return AttentionViews(
        layer=layer, heads=heads, fused=fuse_heads(heads, head_fusion, dim=0),
        per_layer=per_layer, rollout=rollout, masks=masks, norms=norms,
        high_norm=patch_norms > threshold, norm_threshold=threshold,
        prefix_share=prefix_share,
    )


def query_views(
    maps: AttentionMaps, row: int, col: int, layer: int, head: int | str = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A clicked patch's attention: in ``layer`` and across all layers (image 0).

    Args:
        head: a head index (0-based) or a fusion ("mean", "max", "min").

    Returns:
        ``(in_layer, all_layers)``: (rows, cols) and (L, rows, cols).
    """
    per_layer = query_maps_all_layers(maps, maps.token_index(row, col))[:, 0]  # (L, H, r, c)
    if isinstance(head, str):
        chosen = fuse_heads(per_layer, head, dim=1)
    else:
        if not 0 <= head < maps.num_heads:
            raise ValueError(f"head must be in [0, {maps.num_heads - 1}], not {head}.")
        chosen = per_layer[:, head]
    return chosen[layer], chosen
