"""The attention tab's view model: every view of one screen, for image 0 (no gradio here).

Built from `explorer.attention` results by pure functions; the tab turns them into images
and figures (`explorer.plots.attention`). Tensors stay on the maps' device. Also the one
spelling of a head in the UI (`head_label`, `parse_head`) and what one analysis leaves for
the follow-up events (`Analysis`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from explorer import lecture
from explorer.attention import (
    HEAD_FUSIONS,
    AttentionMaps,
    class_token_maps,
    cls_rollout_map,
    fuse_heads,
    mass_mask,
    patch_rollout_map,
    patch_sinks,
    prefix_attention_share,
    query_maps_all_layers,
)
from explorer.attention.rollout import mask_keys
from explorer.attention.sinks import SINK_FACTOR, Sink
from explorer.patches import ModelGeometry

HEAD = "head "  # how the UI names one head: "head 3" is index 2 (heads are 0-based inside)


def head_label(head: int) -> str:
    """The UI's name of head index ``head``: ``"head 3"`` for 2."""
    return f"{HEAD}{head + 1}"


def head_choices(num_heads: int) -> list[str]:
    """A head picker's choices: the fusions ("mean", "max", "min"), then every head."""
    return [*HEAD_FUSIONS, *(head_label(h) for h in range(num_heads))]


def parse_head(choice: str) -> str | int:
    """A head picker's choice -> a fusion name, or a head index (0-based).

    Raises:
        ValueError: neither a fusion nor `head_label`'s spelling.
    """
    if choice in HEAD_FUSIONS:
        return choice
    number = str(choice)[len(HEAD):] if str(choice).startswith(HEAD) else ""
    if not number.isdigit() or int(number) < 1:
        raise ValueError(f"Unknown head {choice!r}: one of {', '.join(HEAD_FUSIONS)} or "
                         f"'{head_label(0)}', '{head_label(1)}', ...")
    return int(number) - 1


@dataclass
class Analysis:
    """What one attention analysis leaves for the follow-up events (re-renders, patch clicks,
    the distance tab), kept by the session (`explorer.session_context`).

    Attributes:
        maps: the captured attention (float16 q, k and head means).
        geometry: the analysed model's geometry.
        shown: (H, W, 3) the model's input as displayed.
        prefix_share: (L, P) share of patch queries' attention to each prefix token.
        relevance: (rows, cols) class-specific map (classifier models only), else None.
        relevance_note: what the relevance view shows, in words.
        note: the analysis in words (model, size, grid, layers and heads, prefix tokens).
        drawn: the settings the session's views were last drawn with (None: not yet).
        sinks: each block's patch attention sinks (`layer_sinks`).
    """

    maps: AttentionMaps
    geometry: ModelGeometry
    shown: np.ndarray
    prefix_share: torch.Tensor
    relevance: torch.Tensor | None
    relevance_note: str
    note: str
    drawn: object | None = None
    sinks: list[list[Sink]] | None = None


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
    masked: Sequence[int] = (),
) -> AttentionViews:
    """Compute every view of the tab for image 0 (pass ``prefix_share`` to reuse it).

    Args:
        masked: tokens (e.g. attention sinks, `sink_tokens`) taken out of the class-token
            maps, the masks and the rollout, the other weights renormalised
            (`masked_class_token_maps`, `explorer.attention.attention_rollout`'s ``masked``).
    """
    if not 0 <= layer < maps.num_layers:
        raise ValueError(f"layer must be in [0, {maps.num_layers - 1}], not {layer}.")
    heads = masked_class_token_maps(maps, layer, masked)[0]
    per_layer = torch.stack([fuse_heads(masked_class_token_maps(maps, i, masked)[0], head_fusion)
                             for i in range(maps.num_layers)])
    rollout = rollout_map(maps, masked, head_fusion=rollout_fusion, discard_ratio=discard_ratio,
                          start_layer=start_layer)
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


def layer_sinks(maps: AttentionMaps) -> list[list[Sink]]:
    """Each block's patch attention sinks for image 0 (`explorer.attention.patch_sinks`):
    patches that take an outsized share of every query's attention (heads averaged)."""
    if maps.head_mean is not None:  # kept head means: no probabilities to recompute
        return [patch_sinks(m[0], maps.num_prefix_tokens) for m in maps.head_mean]
    return [patch_sinks(p[0], maps.num_prefix_tokens)
            for _, p in maps.iter_probs(range(maps.num_layers))]


def sink_note(sinks: list[list[Sink]], grid: tuple[int, int], num_prefix_tokens: int,
              num_tokens: int) -> str:
    """The attention sinks of `layer_sinks` in words, for beside an attention map ("" if none).

    Names the strongest patch sink and every block in which that patch is one.
    """
    found = [(b, s) for b, block in enumerate(sinks) for s in block]
    if not found:
        return ""
    block, top = max(found, key=lambda bs: bs[1].share)
    row, col = divmod(top.token - num_prefix_tokens, grid[1])
    blocks = [b + 1 for b, s in found if s.token == top.token]
    listed = ", ".join(str(b) for b in blocks)
    return (f"**Attention sink:** in block {block + 1} the tokens put on average {top.share:.0%} "
            f"of their attention on the patch at row {row + 1}, column {col + 1} (uniform: "
            f"{1 / num_tokens:.1%}); it is a sink in block{'s' if len(blocks) > 1 else ''} "
            f"{listed}. Rollout multiplies such a sink through the blocks above, so it can be "
            "the brightest patch of the rollout map without being part of the object.")


def masked_class_token_maps(maps: AttentionMaps, layer: int, tokens: Sequence[int] = ()
                            ) -> torch.Tensor:
    """`explorer.attention.class_token_maps` with ``tokens`` taken out of each head's
    attention and the rest of each query's row renormalised (`mask_keys`): the class token's
    row (models without one: every patch query's row, then averaged over them).

    Returns:
        (B, heads, rows, cols).
    """
    if not tokens:
        return class_token_maps(maps, layer)
    p = maps.num_prefix_tokens
    if maps.has_class_token:
        r = mask_keys(maps.rows(layer, [0]), tokens)[:, :, 0, p:]  # (B, heads, patches)
    else:
        r = mask_keys(maps.probs(layer)[:, :, p:], tokens)[..., p:].mean(dim=2)
    return r.reshape(*r.shape[:-1], *maps.grid)


def sink_tokens(sinks: list[list[Sink]]) -> list[int]:
    """Every token that is a patch sink in some block (`layer_sinks`), in sequence order:
    what the "masked" views take out."""
    return sorted({s.token for block in sinks for s in block})


SINK_VIEWS = ("as they are", "masked")  # the attention tab's choice for sink tokens


def _place(token: int, grid: tuple[int, int], num_prefix_tokens: int) -> str:
    row, col = divmod(token - num_prefix_tokens, grid[1])
    return f"row {row + 1}, column {col + 1}"


def sink_view_note(sinks: list[list[Sink]], grid: tuple[int, int], num_prefix_tokens: int,
                   num_tokens: int, rollout, other_rollout, masked: bool,
                   source: str = "class token") -> str:
    """What the rollout map beside it shows with sinks as they are or masked, in words.

    Computed from the maps themselves (`explorer.lecture.rollout_facts`): where the shown
    rollout peaks and how far above the mean, whether that patch is an attention sink, and
    where the other view (masked / as they are) peaks, so the choice's effect is stated.

    Args:
        sinks: each block's patch sinks (`layer_sinks`).
        rollout: (rows, cols) the rollout shown; other_rollout: the same with the other choice.
        masked: whether ``rollout`` has the sink tokens (`sink_tokens`) masked.
        source: whose rollout it is ("class token", or the patch queries' mean).
    """
    tokens = sink_tokens(sinks)
    shown = lecture.rollout_facts(np.asarray(rollout, dtype=np.float64), sinks,
                                  num_prefix_tokens, num_tokens)
    other = lecture.rollout_facts(np.asarray(other_rollout, dtype=np.float64), sinks,
                                  num_prefix_tokens, num_tokens)
    if not tokens:
        return (f"No attention sink: no patch receives {SINK_FACTOR:g}× the uniform share of "
                f"attention ({1 / num_tokens:.1%}) in any block, so masking changes nothing. "
                f"The {source}'s rollout peaks at {_peak(shown, grid, num_prefix_tokens)}.")
    places = "; ".join(_place(t, grid, num_prefix_tokens) for t in tokens[:4])
    what = (f"the sink patch (at {places})" if len(tokens) == 1 else
            f"the {len(tokens)} sink patches (at {places}{'; …' if len(tokens) > 4 else ''})")
    intro = sink_note(sinks, grid, num_prefix_tokens, num_tokens)
    if masked:
        return (f"{intro}\n\n**Shown: sinks masked.** With {what} taken out of every block's "
                f"attention (each query's other weights renormalised), the {source}'s rollout "
                f"peaks at {_peak(shown, grid, num_prefix_tokens)} and the brightest tenth of the "
                f"patches hold {shown.top_tenth:.0%} of it; as they are, it peaks at "
                f"{_peak(other, grid, num_prefix_tokens)}, {other.top_tenth:.0%} in the brightest "
                "tenth. What remains shows where the attention that is not parked on a sink goes.")
    verdict = (" That patch is itself a sink: the peak shows where attention is parked, not "
               "the object." if shown.sink is not None else
               " That patch is not a sink itself.")
    return (f"{intro}\n\n**Shown: sinks as they are.** The {source}'s rollout peaks at "
            f"{_peak(shown, grid, num_prefix_tokens)}.{verdict} Choose *masked* to take {what} "
            f"out: then it peaks at {_peak(other, grid, num_prefix_tokens)}.")


def _peak(facts, grid: tuple[int, int], num_prefix_tokens: int) -> str:
    """A map's brightest patch in words: where, its share and how many times the mean."""
    row, col = facts.peak
    return (f"row {row + 1}, column {col + 1} ({facts.peak_share:.1%} of the rollout, "
            f"{facts.peak_share / facts.mean_share:.0f}× the mean patch)")


def rollout_map(maps: AttentionMaps, masked: Sequence[int] = (), **settings) -> torch.Tensor:
    """(rows, cols) rollout of image 0: the class token's for models with one, else the patch
    queries' mean; ``settings``: `explorer.attention.attention_rollout`'s (head_fusion,
    discard_ratio, start_layer), ``masked`` tokens taken out of every block."""
    chosen = cls_rollout_map if maps.has_class_token else patch_rollout_map
    return chosen(maps, masked=list(masked), **settings)[0]

