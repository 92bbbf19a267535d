"""Attention maps of a timm Vision Transformer: every layer and head, rollout, relevance.

The one entry point is `attention_maps(model, pixels)`: one forward pass that keeps, per
block, the queries and keys the attention used (after ``q_norm``/``k_norm``, q already
scaled) and the head-averaged map. Full attention probabilities are **not stored**; they
are computed on demand, one layer at a time, from q and k:

    >>> maps = attention_maps(model, pixels)      # one forward, (B, 3, H, W) in
    >>> p = maps.probs(5)                          # (B, heads, N, N), a fresh tensor
    >>> cls_rows = maps.rows(5, [0])               # (B, heads, 1, N): only the rows asked for
    >>> for layer, p in maps.iter_probs():         # every layer once, one reused buffer
    ...     ...                                    # (clone p if you keep it)
    >>> everything = maps.stack()                  # (L, B, heads, N, N): all of it, big
    >>> roll = attention_rollout(maps, rows=[0])   # (B, 1, N) class-token rollout, fast
    >>> attention_maps(model, pixels, on_probs=lambda layer, p: ...)  # reduce while it runs

Why on demand and not stored (measured, BENCHMARKS.md "Attention maps"): the maps of all 12
layers of ViT-S/14 at 518 px are 0.5 GB, and writing them to fresh memory costs more than
computing them again (page faults), while q and k are 2 MB per layer. The views need each
layer once (rollout, distance, prefix shares: `on_probs` or `iter_probs`) or only a few rows
(the class token, a clicked patch: `rows`), so nothing needs the whole stack at once.

During the capture forward each block computes its probabilities itself, once (the model's
fused kernel would compute q kᵀ without exposing it, and we would have to compute it
again): on CPU a compiled kernel (`explorer.kernels`, `attend_materialised`) does q kᵀ,
softmax, the head mean and ``@ v`` block by block in cache, and writes the full maps to
memory only for an ``on_probs`` reader. Measured on this project's 2-core CPU, ViT-S/14:
the capture plus class-row rollout costs 1.08-1.13x the plain fused forward at 224 px and
1.13-1.19x at 518 px, against 1.63-2.29x for `timm.utils.AttentionExtract` and Hugging
Face's ``output_attentions`` at 518 px. The model's fused-attention setting is never touched
and everything attached for the capture is removed afterwards, also when several threads
capture through one model at once (see `attention_maps`).

Token order is timm's: prefix tokens first (class, then distillation or registers), then
patches row-major over ``maps.grid`` = (rows, cols). ``N = num_prefix_tokens + rows * cols``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from timm.layers import Attention as TimmAttention
from torch import nn

from explorer import kernels
from explorer.patches import grid_for, patch_size, prefix_token_names

HEAD_FUSIONS = ("mean", "max", "min")


# ---------------------------------------------------------------------------------------
# Capturing q and k from an ordinary (fused) forward
# ---------------------------------------------------------------------------------------


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The ``attn`` module of every block, checked to be timm's q/k-normed `Attention`."""
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


@contextmanager
def _hooks(handles: list) -> Iterator[None]:
    """Remove every hook on exit, whatever happens inside."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _this_thread_only(fn):
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
        capture = self.by_thread.get(threading.get_ident())
        if capture is None or attn_mask is not None or is_causal:
            return type(self.attn).forward(self.attn, x, attn_mask=attn_mask, is_causal=is_causal)
        return capture(x)


_ROUTES_LOCK = threading.Lock()


@contextmanager
def _routed(attns: Sequence[nn.Module], captures: Sequence[Callable]) -> Iterator[None]:
    """Route this thread's calls of each ``attn`` to its capture function while inside."""
    me = threading.get_ident()
    with _ROUTES_LOCK:
        for attn, capture in zip(attns, captures, strict=True):
            router = vars(attn).get("forward")
            if not isinstance(router, _ThreadRoutedForward):
                router = attn.forward = _ThreadRoutedForward(attn)
            router.by_thread[me] = capture
    try:
        yield
    finally:
        with _ROUTES_LOCK:
            for attn in attns:
                router = vars(attn)["forward"]
                del router.by_thread[me]
                if not router.by_thread:
                    del attn.forward  # back to the class's own (fused) forward


@dataclass
class AttentionMaps:
    """Everything the attention views need from one forward pass.

    Attributes:
        q: per block, (B, heads, N, head_dim) queries as the attention used them, already
            multiplied by the softmax scale (1/sqrt(head_dim)). Empty if the capture was
            asked not to keep them (``keep_qk=False``): then `probs` and `rows` are unavailable.
        k: per block, (B, heads, N, head_dim) keys (empty like ``q``).
        grid: (rows, cols) of patch tokens for this input.
        patch_size: (height, width) of a patch in input pixels.
        num_prefix_tokens: class + distillation + register tokens before the patches.
        prefix_names: a name per prefix token: "CLS", "DIST", "REG1", ...
            (`explorer.patches.prefix_token_names`).
        features: (B, N, D) output of ``model.forward_features`` (after the final norm).
        token_norms: (L, B, N) L2 norm of every token in the residual stream after each
            block (before the final norm): the high-norm "artifact" tokens show here.
        num_heads: attention heads per block.
        logits: (B, classes) for models with a classifier head, else None.
        head_mean: per block, (B, N, N) attention averaged over heads, if it was kept
            (``attention_maps(..., keep_head_mean=True)``): the fast path for rollout.
    """

    q: list[torch.Tensor]
    k: list[torch.Tensor]
    grid: tuple[int, int]
    patch_size: tuple[int, int]
    num_prefix_tokens: int
    prefix_names: list[str]
    features: torch.Tensor
    token_norms: torch.Tensor
    num_heads: int
    logits: torch.Tensor | None = None
    head_mean: list[torch.Tensor] | None = None

    @property
    def num_layers(self) -> int:
        return self.token_norms.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.token_norms.shape[2]

    @property
    def batch_size(self) -> int:
        return self.token_norms.shape[1]

    def _qk(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.q:
            raise ValueError("These maps were captured with keep_qk=False: no q and k to "
                             "compute probabilities from; capture with keep_qk=True.")
        return self.q[layer], self.k[layer]

    def token_index(self, row: int, col: int) -> int:
        """Token index of the patch at grid position (row, col)."""
        rows, cols = self.grid
        if not (0 <= row < rows and 0 <= col < cols):
            raise IndexError(f"Patch ({row}, {col}) is outside the {rows}x{cols} grid.")
        return self.num_prefix_tokens + row * cols + col

    def probs(self, layer: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention probabilities of one block: softmax(q kᵀ / sqrt(d)).

        Args:
            layer: block index (negative counts from the end).
            out: optional (B, heads, N, N) float tensor to write into (saves the allocation,
                which for big maps costs more than the arithmetic).

        Returns:
            (B, heads, N, N); rows (queries) sum to 1.
        """
        q, k = self._qk(layer)
        out = torch.matmul(q, k.transpose(-2, -1), out=out)
        return _softmax_(out)

    def rows(self, layer: int, queries: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Only some query rows of `probs`: cheap (R x N per head instead of N x N).

        Returns:
            (B, heads, R, N) for R = len(queries).
        """
        q, k = self._qk(layer)
        index = torch.as_tensor(queries, dtype=torch.long, device=q.device)
        return torch.matmul(q.index_select(2, index), k.transpose(-2, -1)).softmax(dim=-1)

    def iter_probs(self, layers: Sequence[int] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(layer, probs)`` for each layer, reusing one buffer.

        Each yielded tensor is overwritten by the next step: clone it to keep it.
        """
        layers = range(self.num_layers) if layers is None else layers
        buffer = None
        for layer in layers:
            buffer = self.probs(layer, out=buffer)
            yield layer, buffer

    def stack(self) -> torch.Tensor:
        """All layers at once: (L, B, heads, N, N). At high resolution this is large."""
        q = self._qk(0)[0]
        L, (B, H, N, _) = self.num_layers, q.shape
        out = torch.empty(L, B, H, N, N, dtype=q.dtype, device=q.device)
        for layer in range(L):
            self.probs(layer, out=out[layer])
        return out


def _softmax_(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, in place (no second N x N allocation).

    ATen's softmax kernel works row by row (max, then exp and sum, then scale), so writing
    its output over its input is safe; one fused kernel is ~2x faster than five in-place
    elementwise passes (measured, bench "attention").
    """
    if not scores.is_contiguous():  # ATen's out= over a strided input gives wrong rows
        return scores.copy_(scores.softmax(dim=-1))
    return torch._softmax(scores, -1, False, out=scores)


ProbsConsumer = Callable[[int, torch.Tensor], None]  # (layer, (B, H, N, N) probs) -> None


def _inline_ok(attn: nn.Module) -> bool:
    """Whether `_inline_forward` reproduces this attention module exactly.

    True for timm's own `Attention` without a gate, in eval mode (no attention dropout).
    """
    return (type(attn) is TimmAttention and getattr(attn, "gate", None) is None
            and not attn.training)


# Rows of one head's (N, N) map processed together on CPU: R * N floats ~ 512 KB, so the
# block is still in L2 when its softmax, head-mean share and `@ v` read it.
_BLOCK_BYTES = 1 << 19
# Below this size one image's (H, N, N) maps are done in one batched pass (224 px: 1.6 MB);
# the PyTorch-ops path only.
_IMAGE_BYTES = 2 << 20


def native_attend_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether `attend_materialised` runs the compiled kernel for CPU tensors of ``dtype``."""
    return dtype == torch.float32 and kernels.attend_op() is not None


def attend_materialised(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    probs_out: torch.Tensor | None = None,
    mean_out: torch.Tensor | None = None,
    native: bool = True,
) -> torch.Tensor:
    """Attention that also yields its probabilities: softmax(q kᵀ) @ v.

    On CPU the work goes in blocks of query rows small enough to stay in L2, so each block
    of probabilities is computed once and read back from cache by its softmax, its share of
    the head mean and ``@ v``. For float32 the compiled kernel (`explorer.kernels`, built on
    first use) does this in one call, blocks spread over the threads; otherwise, or with
    ``native=False``, PyTorch ops do the same block by block (slower: one op per block and
    head from Python). Other devices: four batched ops. Measured on ViT-S/14 at 518 px,
    BENCHMARKS.md "Attention maps".

    Args:
        q: (B, H, N, d) queries, already scaled.
        k: (B, H, N, d) keys.
        v: (B, H, N, d) values.
        probs_out: optional (B, H, N, N) contiguous buffer: receives the probabilities. Pass
            one only if something reads them: without it the kernel keeps each block in cache
            and never writes the maps to memory (at 518 px, 45 MB per layer).
        mean_out: optional (B, N, N) contiguous buffer: receives their mean over heads.
        native: allow the compiled kernel (False: PyTorch ops, e.g. to compare).

    Returns:
        (B, N, H, d) contiguous attention output (heads not yet merged).
    """
    B, H, N, d = q.shape
    op = _kernel_for(q, k, v) if native else None
    if op is not None:
        if q.stride(-1) != 1:
            q = q.contiguous()
        if k.stride(-1) != 1 and k.stride(-2) != 1:
            k = k.contiguous()
        rows = _kernel_block_rows(B, N, q.element_size(), torch.get_num_threads())
        return op(q, k, v.contiguous(), probs_out, mean_out, rows)
    if probs_out is None:
        probs_out = torch.empty(B, H, N, N, dtype=q.dtype, device=q.device)
    if q.device.type != "cpu":
        return _attend_batched(q, k, v, probs_out, mean_out)
    return _attend_blocks(q, k, v, probs_out, mean_out)


def _kernel_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable | None:
    """The compiled op if `attend_materialised` runs it on these tensors, else None."""
    if q.device.type != "cpu" or not q.dtype == k.dtype == v.dtype:
        return None
    return kernels.attend_op() if native_attend_available(q.dtype) else None


def _kernel_block_rows(batch: int, tokens: int, itemsize: int, threads: int) -> int:
    """Query rows per block for the kernel: ~`_BLOCK_BYTES` of map per block, and blocks in a
    multiple of the thread count (at least 3 per thread on small inputs) so no thread idles."""
    rows = max(1, min(tokens, _BLOCK_BYTES // (tokens * itemsize)))
    blocks = min(tokens, max(-(-tokens // rows), -(-3 * threads // batch)))
    while (batch * blocks) % threads and blocks < tokens:
        blocks += 1
    return -(-tokens // blocks)


def _attend_blocks(q, k, v, probs_out, mean_out=None) -> torch.Tensor:
    """`attend_materialised` with PyTorch ops on CPU: image by image when one image's maps
    fit in L2, else head by head in blocks of query rows. Same arguments and result."""
    B, H, N, d = q.shape
    out = torch.empty(B, N, H, d, dtype=q.dtype, device=q.device)
    kt = k.transpose(-2, -1).contiguous()  # (B, H, d, N): a plain GEMM operand (no copy if so)
    v = v.contiguous()
    if H * N * N * q.element_size() <= _IMAGE_BYTES:  # one image's maps fit in L2
        # one image per thread at a time: each core keeps its image's maps in its own L2
        step = max(1, torch.get_num_threads())
        for b in range(0, B, step):
            e = min(B, b + step)
            probs = probs_out[b:e]  # (c, H, N, N)
            # 3-d bmm with a contiguous out: 4-d matmul(out=) computes into a temporary first
            torch.bmm(q[b:e].reshape(-1, N, d), kt[b:e].view(-1, d, N),
                      out=probs.view(-1, N, N))
            _softmax_(probs)
            if mean_out is not None:
                torch.mean(probs, dim=1, out=mean_out[b:e])
            pv = torch.bmm(probs.view(-1, N, N), v[b:e].view(-1, N, d))  # (c H, N, d)
            out[b:e].copy_(pv.view(e - b, H, N, d).transpose(1, 2))
        return out
    rows = max(1, min(N, _BLOCK_BYTES // (N * q.element_size())))
    for b in range(B):
        # heads outer: one head's keys and values stay in L2 while its row blocks go by
        n_blocks = -(-N // rows)
        mean_blocks = [None] * n_blocks if mean_out is None else mean_out[b].split(rows)
        for h in range(H):
            kt_h, v_h = kt[b, h], v[b, h]
            blocks = zip(q[b, h].split(rows), probs_out[b, h].split(rows),
                         out[b, :, h].split(rows), mean_blocks, strict=True)
            for q_block, block, out_block, mean_block in blocks:  # block: (R, N), contiguous
                torch.mm(q_block, kt_h, out=block)
                _softmax_(block)
                if mean_block is not None:
                    if h == 0:
                        mean_block.copy_(block)
                    else:
                        mean_block.add_(block)
                torch.mm(block, v_h, out=out_block)
        if mean_out is not None:
            mean_out[b].mul_(1.0 / H)
    return out


def _attend_batched(q, k, v, probs_out, mean_out=None) -> torch.Tensor:
    """`attend_materialised` as four batched ops (the GPU path): same arguments and result."""
    probs = _softmax_(torch.matmul(q, k.transpose(-2, -1), out=probs_out))
    if mean_out is not None:
        torch.mean(probs, dim=1, out=mean_out)
    return torch.matmul(probs, v).transpose(1, 2).contiguous()


def _inline_forward(attn: nn.Module, layer: int, record: Callable, workspace: dict,
                    keep_head_mean: bool, want_probs: bool) -> Callable:
    """The capturing thread's ``forward(x)`` for timm `Attention`: it materialises the
    probabilities (installed through `_routed`).

    The same computation as timm's eager path (q·scale @ kᵀ, softmax, @ v) by
    `attend_materialised`, so the capture forward computes q kᵀ once (the fused kernel would
    compute it, and we again). The full (B, H, N, N) map is written, into one workspace
    reused by every block, only when ``want_probs`` (an ``on_probs`` reader) or when the
    PyTorch-ops path needs it as scratch; the head mean is always computed.
    """

    def forward(x):
        B, N, _ = x.shape
        H, d = attn.num_heads, attn.head_dim
        q, k, v = attn.qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q) * attn.scale, attn.k_norm(k)  # (B, H, N, d)
        # k as a view of a compact (B, H, d, N) copy: the GEMM operand, and what the maps keep
        # (a view into the qkv output would keep all of q, k and v alive for every layer)
        k = k.transpose(-2, -1).contiguous().transpose(-2, -1)
        buf = None  # the full maps: written only for a reader, or as the PyTorch path's scratch
        if want_probs or _kernel_for(q, k, v) is None:
            buf = workspace.get("probs")
            if buf is None or buf.shape != (B, H, N, N) or buf.dtype != q.dtype:
                buf = workspace["probs"] = torch.empty(B, H, N, N, dtype=q.dtype,
                                                       device=q.device)
        mean = torch.empty(B, N, N, dtype=q.dtype, device=q.device) if keep_head_mean else None
        out = attend_materialised(q, k, v, buf, mean)
        record(layer, q, k, buf, mean)
        return attn.proj_drop(attn.proj(attn.norm(out.view(B, N, H * d))))

    return forward


def attention_maps(
    model: nn.Module,
    pixels: torch.Tensor,
    on_probs: ProbsConsumer | None = None,
    keep_head_mean: bool = True,
    inline: bool = True,
    keep_qk: bool = True,
) -> AttentionMaps:
    """Run ``model`` once on ``pixels`` and capture what every attention view needs.

    Works for timm `VisionTransformer` (plain, DeiT distilled, DINOv2 with or without
    registers, ``qk_norm``) at any size the model accepts (build it with
    ``dynamic_img_size=True`` for other resolutions and aspect ratios), and batches.
    Nothing about the model changes: its fused-attention setting is never touched, and
    whatever is attached for the capture (hooks, a per-instance ``forward`` on each
    ``attn``) is removed before returning; other threads using the model meanwhile run its
    ordinary fused forward, or their own capture.

    Two ways to capture, same result:

    - ``inline=True`` (default, for timm `Attention` in eval mode): during this one forward
      each block computes its probabilities itself (q kᵀ computed once; on CPU by the
      compiled kernel, see `attend_materialised`), hands them to ``on_probs`` (written into
      one reused workspace only when ``on_probs`` is given) and keeps their head mean for
      rollout. Per layer they equal softmax(q kᵀ/√d) of that layer's input to ~1e-6; against
      a separate eager forward, deeper layers differ by fp32 rounding in the residual stream
      (~1e-5, as much as timm's own fused forward does).
    - ``inline=False`` (and the fallback for other modules): the model runs its own fused
      attention; hooks on ``q_norm``/``k_norm`` record q and k only.

    Args:
        model: a timm VisionTransformer.
        pixels: (B, 3, H, W) normalised input, H and W multiples of the patch size.
        on_probs: called as ``on_probs(layer, probs)`` with each block's (B, heads, N, N)
            probabilities while the forward runs (inline capture) or right after it: the
            cheapest way to reduce every layer once (e.g. mean attention distance). The
            tensor is a reused buffer, valid only during the call.
        keep_head_mean: keep each layer's (B, N, N) head-mean map for a fast rollout.
        inline: see above.
        keep_qk: keep every layer's q and k (what `probs` and `rows` compute from). Pass
            False when ``on_probs`` is all you need (a reduction over a dataset): holding
            them makes every batch allocate fresh memory (measured on this CPU: mean attention
            distance over batches of 32 went from 1.28-1.38x to 1.14-1.16x the plain forward
            when it stopped keeping them; BENCHMARKS.md "Mean attention distance").

    Returns:
        `AttentionMaps`; attention probabilities come from its `probs`/`rows` on demand.

    Raises:
        TypeError: the model is not built from timm attention blocks.
        ValueError: pixels are not (B, 3, H, W) with whole patches.
        RuntimeError: fewer blocks were captured than the model has (e.g. a block skipped).
    """
    attns = _attention_modules(model)
    ph, pw = patch_size(model)
    if pixels.dim() != 4 or pixels.shape[-2] % ph or pixels.shape[-1] % pw:
        raise ValueError(
            f"Expected (B, 3, H, W) pixels with H, W a multiple of the {ph}x{pw} patch size, "
            f"got {tuple(pixels.shape)}."
        )
    blocks = list(model.blocks)
    L = len(attns)
    qs: list[torch.Tensor | None] = [None] * L
    ks: list[torch.Tensor | None] = [None] * L
    means: list[torch.Tensor | None] = [None] * L
    norms: list[torch.Tensor | None] = [None] * L
    seen = [False] * L  # blocks whose attention the inline capture computed

    def record(i, q, k, probs, mean=None):
        seen[i] = True
        if keep_qk:
            qs[i], ks[i] = q, k
        if keep_head_mean:
            means[i] = probs.mean(dim=1) if mean is None else mean
        if on_probs is not None:
            on_probs(i, probs)

    def keep(store, i, scale=None):
        def hook(_module, _args, output):
            store[i] = output.detach() * scale if scale is not None else output.detach()

        return _this_thread_only(hook)

    def norm_hook(i):
        def hook(_module, _args, output):
            norms[i] = output.detach().norm(dim=-1)

        return _this_thread_only(hook)

    handles, patched, captures, workspace = [], [], [], {}
    for i, (attn, blk) in enumerate(zip(attns, blocks, strict=True)):
        handles.append(blk.register_forward_hook(norm_hook(i)))
        if inline and _inline_ok(attn):
            patched.append(attn)
            captures.append(_inline_forward(attn, i, record, workspace, keep_head_mean,
                                            want_probs=on_probs is not None))
        else:
            handles.append(attn.q_norm.register_forward_hook(keep(qs, i, attn.scale)))
            handles.append(attn.k_norm.register_forward_hook(keep(ks, i)))
    with _hooks(handles), _routed(patched, captures), torch.no_grad():
        features = model.forward_features(pixels)
        logits = model.forward_head(features) if getattr(model, "num_classes", 0) else None

    captured = sum(s or (q is not None and k is not None)
                   for s, q, k in zip(seen, qs, ks, strict=True))
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
    maps = AttentionMaps(
        q=qs, k=ks, grid=grid, patch_size=(ph, pw), num_prefix_tokens=num_prefix,
        prefix_names=prefix_token_names(model), features=features,
        token_norms=token_norms, num_heads=int(attns[0].num_heads), logits=logits,
    )
    if not patched and (on_probs is not None or keep_head_mean):  # hooks path: one pass now
        for i, p in maps.iter_probs():
            record(i, qs[i], ks[i], p)
    maps.head_mean = means if keep_head_mean and all(m is not None for m in means) else None
    if not keep_qk:
        maps.q, maps.k = [], []
    return maps


# ---------------------------------------------------------------------------------------
# Head fusion, rollout
# ---------------------------------------------------------------------------------------


def fuse_heads(attn: torch.Tensor, how: str = "mean", dim: int = -3) -> torch.Tensor:
    """Combine heads: mean, max or min over ``dim`` (heads are dim -3 of (..., H, N, N))."""
    if how == "mean":
        return attn.mean(dim=dim)
    if how == "max":
        return attn.amax(dim=dim)
    if how == "min":
        return attn.amin(dim=dim)
    raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, not {how!r}.")


def _layer_iter(attn, start_layer: int) -> tuple[int, Iterator[tuple[int, torch.Tensor]]]:
    """(number of layers, iterator over (layer, (..., H, N, N)) from the top down)."""
    if isinstance(attn, AttentionMaps):
        L = attn.num_layers
        return L, attn.iter_probs(range(L - 1, start_layer - 1, -1))
    if isinstance(attn, torch.Tensor):
        if attn.dim() < 4:
            raise ValueError(f"Expected (L, [B,] H, N, N) attention, got {tuple(attn.shape)}.")
        L = attn.shape[0]
    else:
        L = len(attn)
    return L, ((i, attn[i]) for i in range(L - 1, start_layer - 1, -1))


def _rollout_step(a: torch.Tensor, head_fusion: str, discard_ratio: float) -> torch.Tensor:
    """One layer of rollout: fuse heads, drop the weakest links, add identity, renormalise.

    Args:
        a: (..., H, N, N) attention of one layer.

    Returns:
        (..., N, N) row-stochastic matrix 0.5 (A + I), rows renormalised.
    """
    fused = fuse_heads(a, head_fusion)
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


def attention_rollout(
    attn,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    start_layer: int = 0,
    rows: Sequence[int] | None = None,
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): how much each token mixes into each other.

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
    if (isinstance(attn, AttentionMaps) and attn.head_mean is not None
            and head_fusion == "mean" and discard_ratio == 0):
        # Kept head means: 0.5 (mean_h A_h + I) has rows summing to 1 already.
        means = attn.head_mean[start_layer:]
        eye = torch.eye(attn.num_tokens, dtype=means[0].dtype, device=means[0].device)
        result = eye if rows is None else eye[list(rows)]
        result = result.expand(attn.batch_size, *result.shape)
        for m in reversed(means):
            result = 0.5 * (result @ m + result)
        return result
    _, layers = _layer_iter(attn, start_layer)
    result = None
    for _, a in layers:
        if result is None:  # top layer: start from its rows (or the identity's rows)
            eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
            result = eye if rows is None else eye[list(rows)]
            result = result.expand(*a.shape[:-3], *result.shape).clone()
        if rows is not None and head_fusion == "mean" and discard_ratio == 0:
            # Fast path: r (0.5 (mean_h A_h + I)) = 0.5 (mean_h (r A_h) + r); no fused copy.
            result = 0.5 * (torch.matmul(result.unsqueeze(-3), a).mean(dim=-3) + result)
        else:
            result = result @ _rollout_step(a, head_fusion, discard_ratio)
    return result


def cls_rollout_map(maps: AttentionMaps, **kwargs) -> torch.Tensor:
    """The class token's rollout over the patches, as an image-shaped map.

    Returns:
        (B, rows, cols): how much of the class token's final state traces back to each patch
        (excluding the prefix tokens' own share, so values need not sum to 1).
    """
    r = attention_rollout(maps, rows=[0], **kwargs)[..., 0, maps.num_prefix_tokens :]
    return r.reshape(*r.shape[:-1], *maps.grid)


# ---------------------------------------------------------------------------------------
# Class-specific relevance (Chefer et al. 2021, "Generic attention-model explainability")
# ---------------------------------------------------------------------------------------


def _head_rows(model: nn.Module, num_prefix: int, n_tokens: int) -> list[int]:
    """Tokens the classifier head reads: class (and distillation) token, or all patches."""
    if getattr(model, "dist_token", None) is not None:
        return [0, 1]
    has_cls = getattr(model, "cls_token", None) is not None
    if getattr(model, "global_pool", "token") == "token" and has_cls:
        return [0]
    return list(range(num_prefix, n_tokens))


def class_relevance(
    model: nn.Module, pixels: torch.Tensor, target: int | Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-specific relevance of each patch for a classifier (Chefer et al. 2021b).

    ``R = I``; per block, ``R += Ā R`` with ``Ā = mean_h (∂y_c/∂A_h ⊙ A_h)⁺``. The gradient
    with respect to the (never materialised) fused attention is obtained exactly from the
    chain rule ``∂y/∂A_h = (∂y/∂O_h) V_hᵀ`` where ``O_h = A_h V_h`` is the head's output, so
    the model keeps its fused attention and no parameter gradient is touched.

    Args:
        model: timm VisionTransformer with a classifier head (``num_classes > 0``).
        pixels: (B, 3, H, W) normalised input.
        target: class index (or one per image); None = the predicted class.

    Returns:
        ``(relevance, target)``: (B, rows, cols) patch relevance from the tokens the head
        reads (class token, or the mean over patches for average-pooled models), and the
        (B,) class indices explained.
    """
    if not getattr(model, "num_classes", 0):
        raise ValueError("This model has no classifier head: fine-tune one to explain classes.")
    attns = _attention_modules(model)
    L = len(attns)
    saved: dict[str, list] = {name: [None] * L for name in ("q", "k", "qkv", "out")}

    def keep(name, i):
        def hook(_module, args, output):
            saved[name][i] = args[0] if name == "out" else output

        return _this_thread_only(hook)

    handles = []
    for i, attn in enumerate(attns):
        handles.append(attn.q_norm.register_forward_hook(keep("q", i)))
        handles.append(attn.k_norm.register_forward_hook(keep("k", i)))
        handles.append(attn.qkv.register_forward_hook(keep("qkv", i)))
        handles.append(attn.norm.register_forward_hook(keep("out", i)))  # its input is O
    pixels = pixels.detach().requires_grad_(True)  # a graph even if all weights are frozen
    with _hooks(handles), torch.enable_grad():
        logits = model(pixels)
        B = logits.shape[0]
        if target is None:
            target_t = logits.argmax(dim=-1)
        else:
            target_t = torch.as_tensor(target, dtype=torch.long).reshape(-1).expand(B)
        score = logits.gather(1, target_t[:, None]).sum()
        grads = torch.autograd.grad(score, saved["out"])
    if any(x is None for x in saved["q"]):
        raise RuntimeError("Could not capture every block's attention for relevance.")

    with torch.no_grad():
        N = saved["q"][0].shape[2]
        R = torch.eye(N).expand(B, N, N).clone()
        for i, attn in enumerate(attns):
            H, d = attn.num_heads, attn.head_dim
            a = (saved["q"][i] * attn.scale) @ saved["k"][i].transpose(-2, -1)
            a = a.softmax(dim=-1)  # (B, H, N, N)
            v = saved["qkv"][i].reshape(B, N, 3, H, d)[:, :, 2].transpose(1, 2)  # (B, H, N, d)
            grad_o = grads[i][..., : H * d].reshape(B, N, H, d).transpose(1, 2)
            grad_a = grad_o @ v.transpose(-2, -1)  # (B, H, N, N)
            cam = (grad_a * a).clamp(min=0).mean(dim=1)
            R = R + cam @ R
        num_prefix = int(getattr(model, "num_prefix_tokens", 0))
        rel = R[:, _head_rows(model, num_prefix, N), num_prefix:].mean(dim=1)
        ph, pw = patch_size(model)
        grid = grid_for(pixels.shape[-2:], (ph, pw))
    return rel.reshape(B, *grid), target_t


# ---------------------------------------------------------------------------------------
# Per-head class-token maps, masks, prefix tokens, token norms
# ---------------------------------------------------------------------------------------


def query_maps(maps: AttentionMaps, layer: int, query: int) -> torch.Tensor:
    """One query token's attention over the patches, per head, as images.

    Returns:
        (B, heads, rows, cols).
    """
    r = maps.rows(layer, [query])[:, :, 0, maps.num_prefix_tokens :]
    return r.reshape(*r.shape[:-1], *maps.grid)


def class_token_maps(maps: AttentionMaps, layer: int) -> torch.Tensor:
    """The class token's attention over the patches per head; what DINO visualises.

    Models without a class token (average-pooled) get the attention each patch receives,
    averaged over all patch queries, instead.

    Returns:
        (B, heads, rows, cols).
    """
    if "CLS" in maps.prefix_names:
        return query_maps(maps, layer, maps.prefix_names.index("CLS"))
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
    share = values.cumsum(dim=-1) / values.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    before = share - values / values.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    kept_sorted = before < keep  # a weight is kept if the mass before it is still short
    return torch.zeros_like(kept_sorted).scatter(-1, order, kept_sorted)


def prefix_attention_share(maps: AttentionMaps) -> torch.Tensor:
    """Per layer, the share of the patches' attention that goes to each prefix token.

    Averaged over heads and over patch queries (the prefix tokens' own rows are left out).

    Returns:
        (L, B, num_prefix_tokens); the rest of each row, up to 1, goes to patches.
    """
    p = maps.num_prefix_tokens
    out = torch.zeros(maps.num_layers, maps.batch_size, p)
    if p == 0:
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


# ---------------------------------------------------------------------------------------
# Everything one screen of the attention tab shows, for one image
# ---------------------------------------------------------------------------------------


@dataclass
class AttentionViews:
    """The data behind the attention tab's views for image 0 of `AttentionMaps`.

    Attributes:
        layer: the chosen block (0-based).
        heads: (H, rows, cols) class-token attention of each head in ``layer``.
        fused: (rows, cols) the same, fused over heads.
        per_layer: (L, rows, cols) fused class-token attention of every layer.
        rollout: (rows, cols) class-token rollout over the patches.
        masks: (H, rows, cols) bool, DINO-style: patches holding ``keep`` of each head's mass.
        norms: (N,) token norms after block ``layer`` (prefix tokens first).
        high_norm: (rows*cols,) bool, patches above ``norm_factor`` x the median patch norm.
        norm_threshold: that threshold.
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
    norm_threshold: float
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
    if maps.num_prefix_tokens:
        rollout = cls_rollout_map(maps, head_fusion=rollout_fusion, discard_ratio=discard_ratio,
                                  start_layer=start_layer)[0]
    else:  # no class token: the patches' mean rollout row
        r = attention_rollout(maps, rollout_fusion, discard_ratio, start_layer)[0].mean(dim=0)
        rollout = r.reshape(maps.grid)
    masks = mass_mask(heads.flatten(-2), keep).reshape(heads.shape)
    norms = maps.token_norms[layer, 0]
    patch_norms = norms[maps.num_prefix_tokens :]
    threshold = float(norm_factor * patch_norms.median())
    if prefix_share is None:
        prefix_share = prefix_attention_share(maps)[:, 0]
    return AttentionViews(
        layer=layer, heads=heads, fused=fuse_heads(heads, head_fusion, dim=0),
        per_layer=per_layer, rollout=rollout, masks=masks, norms=norms,
        high_norm=patch_norms > threshold, norm_threshold=threshold, prefix_share=prefix_share,
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
