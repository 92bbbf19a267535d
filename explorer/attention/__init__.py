"""Attention maps of a timm Vision Transformer: capture, rollout, relevance, small analyses.

One module per concept:

- `capture`: ``capture(model, pixels, reductions)``, one forward returning `AttentionMaps`;
  the reductions `QueryKeys`, `HeadMean`, `EachLayer` choose what is kept.
- `maps`: `AttentionMaps`, what every view reads (probabilities computed on demand).
- `attend`: attention that yields its probabilities; the plain-PyTorch path (default).
- `native`: the compiled CPU kernel backend (`explorer.kernels`), used where it runs.
- `rollout`: head fusion, attention rollout, class-token and patch rollout maps.
- `relevance`: Chefer et al.'s class-specific relevance.
- `analyses`: query maps, DINO-style masks, prefix-token shares, high-norm tokens.
- `sinks`: tokens that take an outsized share of attention (attention sinks).

The attention tab's view model lives in `explorer.ui.attention_view`.
"""

from explorer.attention.analyses import (
    class_token_maps,
    high_norm_tokens,
    mass_mask,
    prefix_attention_share,
    query_maps,
    query_maps_all_layers,
)
from explorer.attention.capture import (
    VIEWS,
    EachLayer,
    HeadMean,
    ProbsConsumer,
    QueryKeys,
    Reduction,
    capture,
    shared_capture,
)
from explorer.attention.maps import AttentionMaps
from explorer.attention.relevance import class_relevance
from explorer.attention.rollout import (
    HEAD_FUSIONS,
    attention_rollout,
    cls_rollout_map,
    fuse_heads,
    patch_rollout_map,
)
from explorer.attention.sinks import SINK_FACTOR, Sink, attention_sinks, patch_sinks

__all__ = [
    "HEAD_FUSIONS", "SINK_FACTOR", "VIEWS", "AttentionMaps", "EachLayer", "HeadMean", "ProbsConsumer",
    "QueryKeys", "Reduction", "Sink", "attention_rollout", "attention_sinks", "capture", "class_relevance",
    "class_token_maps", "cls_rollout_map", "fuse_heads", "high_norm_tokens", "mass_mask",
    "patch_rollout_map", "patch_sinks", "prefix_attention_share", "query_maps", "query_maps_all_layers",
    "shared_capture",
]
