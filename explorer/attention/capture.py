"""`capture(model, pixels, reductions)`: one forward that keeps what the attention views read.

Each block computes its probabilities itself, once, during the ordinary forward (the model's
fused kernel would compute q kᵀ without exposing it, and we would compute it again):
`explorer.attention.attend` does q kᵀ, softmax, the head mean and ``@ v`` per block (on CPU
in float32 by the compiled kernel, in cache), and the full maps reach memory only for a
reader that asks for them. Cost against the plain fused forward: BENCHMARKS.md "Attention
maps".

What is kept is chosen by one small object per reduction, as timm's
``forward_intermediates(indices=...)`` chooses blocks:

    >>> maps = capture(model, pixels)                          # VIEWS: QueryKeys + HeadMean
    >>> maps = capture(model, pixels, [EachLayer(reduce)])     # full maps handed over, nothing kept
    >>> maps = capture(model, pixels, [QueryKeys(), HeadMean(), EachLayer(reduce)])

The model's fused-attention setting is never touched, and whatever the capture attaches (a
per-instance ``forward`` on each ``attn``, hooks) is removed afterwards, also when several
threads capture through one model at once; other threads meanwhile run the model's own
forward.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from timm.layers import Attention as TimmAttention
from torch import nn

from explorer.attention import native
from explorer.attention.attend import attend
from explorer.attention.maps import AttentionMaps
from explorer.batching import MicroBatcher
from explorer.patches import grid_for, has_class_token, patch_size, prefix_token_names

ProbsConsumer = Callable[[int, torch.Tensor], None]  # (layer, (B, H, N, N) probs) -> None


# ---------------------------------------------------------------------------------------
# Reductions: what a capture keeps
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryKeys:
    """Keep every block's scaled q and k: `AttentionMaps.probs`, ``rows``, ``iter_probs``
    and ``stack`` compute maps from them on demand."""


@dataclass(frozen=True)
class HeadMean:
    """Keep every block's (B, N, N) mean over heads: the fast path of mean-fused rollout."""


@dataclass(frozen=True)
class EachLayer:
    """Hand every block's full (B, H, N, N) probabilities to ``fn(layer, probs)``, in layer
    order, while the forward runs: the cheapest way to reduce every layer once (mean
    attention distance). ``probs`` is a reused buffer, valid only during the call."""

    fn: ProbsConsumer


Reduction = QueryKeys | HeadMean | EachLayer

VIEWS: tuple[Reduction, ...] = (QueryKeys(), HeadMean())  # what the attention tab reads


# ---------------------------------------------------------------------------------------
# The capture
# ---------------------------------------------------------------------------------------


def capture(
    model: nn.Module, pixels: torch.Tensor, reductions: Sequence[Reduction] = VIEWS,
    keep_dtype: torch.dtype | None = None,
) -> AttentionMaps:
    """Run ``model`` once on ``pixels`` and keep what ``reductions`` ask for.

    Works for timm `VisionTransformer` (plain, DeiT distilled, DINOv2 with or without
    registers, with or without a class token, ``qk_norm``) at any size the model accepts
    (build it with ``dynamic_img_size=True`` for other resolutions and aspect ratios), on
    any device, and batches. Blocks whose ``attn`` is timm's own `Attention` in eval mode
    compute their maps inline (`inline_attention`); for any other attention module the model
    runs its own forward, hooks on ``q_norm``/``k_norm`` record q and k, and the maps are
    computed from them afterwards with PyTorch ops (same result), adding the bias of any
    attention module that exposes ``logit_bias()`` (relative-position attention).

    Args:
        model: a timm VisionTransformer.
        pixels: (B, 3, H, W) normalised input on the model's device, H and W multiples of
            the patch size.
        reductions: `QueryKeys`, `HeadMean`, `EachLayer` objects (default `VIEWS`).
        keep_dtype: keep q, k and the head means in this dtype, cast block by block as the
            forward runs (float16 for maps kept between events: the result equals
            ``capture(...).compact()`` without ever holding every block in full precision).

    Returns:
        `AttentionMaps`; its ``q``/``k`` are empty without `QueryKeys`, its ``head_mean``
        None without `HeadMean`.

    Raises:
        TypeError: the model is not built from timm attention blocks.
        ValueError: pixels are not (B, 3, H, W) with whole patches.
        RuntimeError: fewer blocks were captured than the model has (e.g. a block skipped).
    """
    attns = attention_modules(model)
    ph, pw = _whole_patches(model, pixels)
    keep_qk = any(isinstance(r, QueryKeys) for r in reductions)
    keep_mean = any(isinstance(r, HeadMean) for r in reductions)
    readers = [r.fn for r in reductions if isinstance(r, EachLayer)]
    L = len(attns)
    qs: list[torch.Tensor | None] = [None] * L
    ks: list[torch.Tensor | None] = [None] * L
    means: list[torch.Tensor | None] = [None] * L
    norms: list[torch.Tensor | None] = [None] * L
    seen = [False] * L  # blocks whose maps were computed
    # all blocks inline, or none: `EachLayer` readers see the layers in order either way
    inline = all(_inline_ok(attn) for attn in attns)

    def kept(t: torch.Tensor) -> torch.Tensor:
        return t if keep_dtype is None else t.to(keep_dtype)

    def record(i, q, k, probs, mean):
        seen[i] = True
        if keep_qk:  # holding q and k costs fresh memory every batch: only when asked
            qs[i], ks[i] = kept(q), kept(k)
        if keep_mean:
            means[i] = kept(probs.mean(dim=1) if mean is None else mean)
        for read in readers:
            read(i, probs)

    handles = [blk.register_forward_hook(_norm_hook(norms, i))
               for i, blk in enumerate(model.blocks)]
    routes = []
    if inline:
        workspace: dict[str, torch.Tensor] = {}
        routes = [_inline_forward(attn, i, record, workspace, keep_mean, bool(readers))
                  for i, attn in enumerate(attns)]
    else:
        for i, attn in enumerate(attns):
            handles.append(attn.q_norm.register_forward_hook(_keep(qs, i, attn.scale)))
            handles.append(attn.k_norm.register_forward_hook(_keep(ks, i)))
    with removing(handles), _routed(attns if inline else [], routes), torch.no_grad():
        features = model.forward_features(pixels)
        logits = model.forward_head(features) if getattr(model, "num_classes", 0) else None

    captured = sum(seen) if inline else sum(
        q is not None and k is not None for q, k in zip(qs, ks, strict=True))
    if captured < L or any(n is None for n in norms):
        raise RuntimeError(f"Captured attention of {captured} blocks, but the model has {L}.")
    grid = grid_for(pixels.shape[-2:], (ph, pw))
    num_prefix = int(getattr(model, "num_prefix_tokens", 0))
    token_norms = torch.stack(norms)  # (L, B, N)
    if token_norms.shape[-1] != num_prefix + grid[0] * grid[1]:
        raise RuntimeError(
            f"{token_norms.shape[-1]} tokens do not match {num_prefix} prefix + "
            f"{grid[0]}x{grid[1]} patches."
        )
    biases = [attn.logit_bias().detach() if hasattr(attn, "logit_bias") else None
              for attn in attns]
    maps = AttentionMaps(
        q=qs, k=ks, grid=grid, patch_size=(ph, pw), num_prefix_tokens=num_prefix,
        prefix_names=prefix_token_names(model), has_class_token=has_class_token(model),
        features=features, token_norms=token_norms, num_heads=int(attns[0].num_heads),
        logits=logits, logit_bias=biases if any(b is not None for b in biases) else None,
    )
    if not inline and (keep_mean or readers):  # the model ran its own attention: maps now
        for i, p in maps.iter_probs():
            record(i, qs[i], ks[i], p, None)
    maps.head_mean = means if keep_mean else None
    if not keep_qk:
        maps.q, maps.k = [], []
    return maps


def _whole_patches(model: nn.Module, pixels: torch.Tensor) -> tuple[int, int]:
    """The model's patch size, checked to tile ``pixels`` ((B, 3, H, W))."""
    ph, pw = patch_size(model)
    if pixels.dim() != 4 or pixels.shape[-2] % ph or pixels.shape[-1] % pw:
        raise ValueError(
            f"Expected (B, 3, H, W) pixels with H, W a multiple of the {ph}x{pw} patch size, "
            f"got {tuple(pixels.shape)}."
        )
    return ph, pw


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The ``attn`` module of every block, checked to be timm-style (qkv, q_norm, k_norm, norm)."""
    blocks = list(getattr(model, "blocks", []))
    if not blocks:
        raise TypeError(f"{type(model).__name__} has no `blocks`: not a timm VisionTransformer.")
    attns = []
    for i, blk in enumerate(blocks):
        attn = getattr(blk, "attn", None)
        if attn is None or not all(hasattr(attn, a) for a in ("qkv", "q_norm", "k_norm", "norm")):
            raise TypeError(
                f"Block {i} ({type(blk).__name__}) has no timm-style `attn` with "
                "qkv/q_norm/k_norm; attention extraction supports timm VisionTransformer blocks."
            )
        attns.append(attn)
    return attns


# ---------------------------------------------------------------------------------------
# The inline path: timm's `Attention.forward`, with its probabilities
# ---------------------------------------------------------------------------------------


def _inline_ok(attn: nn.Module) -> bool:
    """Whether `inline_attention` reproduces this module's forward exactly: timm's own
    `Attention` without a gate, in eval mode (no attention dropout). Tested against timm's
    forward for every block layout we show (tests/test_attention.py)."""
    return (type(attn) is TimmAttention and getattr(attn, "gate", None) is None
            and not attn.training)


def inline_attention(
    attn: nn.Module,
    x: torch.Tensor,
    probs_out: torch.Tensor | None = None,
    mean_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm `Attention.forward(x)` (eval, no mask) with its probabilities exposed.

    The eager formula (q·scale @ kᵀ, softmax, @ v) computed by `attend`, so q kᵀ is
    computed once.

    Args:
        attn: timm `Attention` (`_inline_ok`).
        x: (B, N, C) block input.
        probs_out, mean_out: as `attend`: (B, H, N, N) and (B, N, N) buffers or None.

    Returns:
        ``(out, q, k)``: (B, N, C) output, (B, H, N, d) scaled queries and keys.
    """
    B, N, _ = x.shape
    H, d = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q) * attn.scale, attn.k_norm(k)  # (B, H, N, d)
    # k as a view of a compact (B, H, d, N) copy: the GEMM operand, and what the maps keep
    # (a view into the qkv output would keep all of q, k and v alive for every layer)
    k = k.transpose(-2, -1).contiguous().transpose(-2, -1)
    out = attend(q, k, v, probs_out, mean_out)  # (B, N, H, d)
    return attn.proj_drop(attn.proj(attn.norm(out.view(B, N, H * d)))), q, k


def _inline_forward(attn: nn.Module, layer: int, record: Callable, workspace: dict,
                    keep_mean: bool, want_probs: bool) -> Callable:
    """The capturing thread's ``forward(x)`` for one timm `Attention` (installed by `_routed`).

    The full (B, H, N, N) map is written, into one workspace reused by every block, only for
    an `EachLayer` reader or where the PyTorch ops need it as scratch.
    """

    def forward(x):
        B, N, _ = x.shape
        H = attn.num_heads
        probs = None  # the full maps: for a reader, or as the PyTorch ops' scratch
        if want_probs or not native.runs_on(x, x, x):  # (q, k, v share x's device and dtype)
            probs = workspace.get("probs")
            if probs is None or probs.shape != (B, H, N, N) or probs.dtype != x.dtype:
                probs = workspace["probs"] = x.new_empty(B, H, N, N)
        mean = x.new_empty(B, N, N) if keep_mean else None
        out, q, k = inline_attention(attn, x, probs, mean)
        record(layer, q, k, probs, mean)
        return out

    return forward


# ---------------------------------------------------------------------------------------
# Attaching to a shared model: per thread, always removed
# ---------------------------------------------------------------------------------------


@contextmanager
def removing(handles: list) -> Iterator[None]:
    """Remove every hook on exit, whatever happens inside."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def this_thread_only(fn: Callable) -> Callable:
    """Wrap a hook so it records only for the thread that registered it.

    Models are shared between Gradio worker threads; another request's ordinary forward
    through the same model must neither be slowed much nor pollute this capture.
    """
    owner = threading.get_ident()

    def hook(*args):
        if threading.get_ident() == owner:
            return fn(*args)
        return None

    return hook


def _keep(store: list, i: int, scale: float | None = None) -> Callable:
    def hook(_module, _args, output):
        store[i] = output.detach() * scale if scale is not None else output.detach()

    return this_thread_only(hook)


def _norm_hook(norms: list, i: int) -> Callable:
    def hook(_module, _args, output):
        norms[i] = output.detach().norm(dim=-1)

    return this_thread_only(hook)


class _ThreadRoutedForward:
    """A per-instance ``forward`` for an attention module, shared by concurrent captures.

    Each capturing thread registers its own function; any other thread (another request's
    ordinary forward) runs the class's own, fused ``forward``. Installed by the first capture
    of a module and removed by the last, under `_ROUTES_LOCK`, so two requests capturing
    through one cached model at once neither lose their maps nor leave a patch behind.
    """

    def __init__(self, attn: nn.Module):
        self.attn = attn
        self.by_thread: dict[int, Callable] = {}

    def __call__(self, x, attn_mask=None, is_causal=False):
        route = self.by_thread.get(threading.get_ident())
        if route is None or attn_mask is not None or is_causal:
            return type(self.attn).forward(self.attn, x, attn_mask=attn_mask, is_causal=is_causal)
        return route(x)


_ROUTES_LOCK = threading.Lock()


@contextmanager
def _routed(attns: Sequence[nn.Module], routes: Sequence[Callable]) -> Iterator[None]:
    """Route this thread's calls of each ``attn`` to its function while inside."""
    me = threading.get_ident()
    with _ROUTES_LOCK:
        for attn, route in zip(attns, routes, strict=True):
            router = vars(attn).get("forward")
            if not isinstance(router, _ThreadRoutedForward):
                router = attn.forward = _ThreadRoutedForward(attn)
            router.by_thread[me] = route
    try:
        yield
    finally:
        with _ROUTES_LOCK:
            for attn in attns:
                router = vars(attn)["forward"]
                del router.by_thread[me]
                if not router.by_thread:
                    del attn.forward  # back to the class's own (fused) forward


# Concurrent captures of one model at one input shape share a forward on a GPU
# (`explorer.batching`); on the CPU each runs alone.
_SHARED = MicroBatcher(capture, AttentionMaps.split)


def shared_capture(model: nn.Module, pixels: torch.Tensor, **kwargs) -> AttentionMaps:
    """`capture`, batched with the captures other requests make at the same moment on the
    same model and input shape when the model is on CUDA; each caller gets its own maps
    (equal to its capture alone). A function, so it pickles by name (a ZeroGPU call)."""
    return _SHARED(model, pixels, **kwargs)
