"""Attention that also yields its probabilities: the plain-PyTorch path, and the dispatch.

`attend` is what every captured block runs: softmax(q kᵀ) @ v plus the probabilities (into
a buffer, for a reader) and their head mean. The compiled CPU kernel
(`explorer.attention.native`) takes the tensors it runs on; everything else (other devices,
dtypes, no compiler, ``EXPLORER_NATIVE=0``) takes the PyTorch ops here, which give the
same numbers: on CPU in blocks that stay in cache, elsewhere as four batched ops.
"""

from __future__ import annotations

import torch

from explorer.attention import native

# Below this size one image's (H, N, N) maps are done in one batched pass (224 px: 1.6 MB).
_IMAGE_BYTES = 2 << 20


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    probs_out: torch.Tensor | None = None,
    mean_out: torch.Tensor | None = None,
    use_native: bool = True,
) -> torch.Tensor:
    """softmax(q kᵀ) @ v, its probabilities and their mean over heads.

    Args:
        q: (B, H, N, d) queries, already scaled.
        k: (B, H, N, d) keys.
        v: (B, H, N, d) values.
        probs_out: optional (B, H, N, N) contiguous buffer: receives the probabilities. Pass
            one only if something reads them: the kernel then never writes the maps.
        mean_out: optional (B, N, N) contiguous buffer: receives their mean over heads.
        use_native: allow the compiled kernel (False: PyTorch ops, e.g. to compare).

    Returns:
        (B, N, H, d) contiguous attention output (heads not yet merged).
    """
    if use_native and native.runs_on(q, k, v):
        return native.attend(q, k, v, probs_out, mean_out)
    B, H, N, _ = q.shape
    if probs_out is None:  # the PyTorch ops need the maps as scratch
        probs_out = torch.empty(B, H, N, N, dtype=q.dtype, device=q.device)
    if q.device.type != "cpu":
        return _attend_batched(q, k, v, probs_out, mean_out)
    return _attend_blocks(q, k, v, probs_out, mean_out)


def softmax_(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, in place (no second N x N allocation).

    ATen's softmax works row by row (max, then exp and sum, then scale), so writing its
    output over its input is safe, and one fused kernel beats five in-place elementwise
    passes (bench "attention").
    """
    if not scores.is_contiguous():  # out= over a strided input gives wrong rows
        return scores.copy_(scores.softmax(dim=-1))
    return torch.softmax(scores, -1, out=scores)


def _attend_blocks(q, k, v, probs_out, mean_out=None) -> torch.Tensor:
    """`attend` with PyTorch ops on CPU: image by image when one image's maps fit in L2,
    else head by head in blocks of query rows. Same arguments and result."""
    B, H, N, d = q.shape
    out = torch.empty(B, N, H, d, dtype=q.dtype, device=q.device)
    kt = k.transpose(-2, -1).contiguous()  # (B, H, d, N): a plain GEMM operand
    v = v.contiguous()
    if H * N * N * q.element_size() <= _IMAGE_BYTES:
        # one image per thread at a time: each core keeps its image's maps in its own L2
        step = max(1, torch.get_num_threads())
        for b in range(0, B, step):
            e = min(B, b + step)
            probs = probs_out[b:e]  # (c, H, N, N)
            # 3-d bmm with a contiguous out: 4-d matmul(out=) computes into a temporary first
            torch.bmm(q[b:e].reshape(-1, N, d), kt[b:e].view(-1, d, N),
                      out=probs.view(-1, N, N))
            softmax_(probs)
            if mean_out is not None:
                torch.mean(probs, dim=1, out=mean_out[b:e])
            pv = torch.bmm(probs.view(-1, N, N), v[b:e].view(-1, N, d))  # (c H, N, d)
            out[b:e].copy_(pv.view(e - b, H, N, d).transpose(1, 2))
        return out
    rows = max(1, min(N, native.BLOCK_BYTES // (N * q.element_size())))
    n_blocks = -(-N // rows)
    for b in range(B):
        # heads outer: one head's keys and values stay in L2 while its row blocks go by
        mean_blocks = [None] * n_blocks if mean_out is None else mean_out[b].split(rows)
        for h in range(H):
            kt_h, v_h = kt[b, h], v[b, h]
            blocks = zip(q[b, h].split(rows), probs_out[b, h].split(rows),
                         out[b, :, h].split(rows), mean_blocks, strict=True)
            for q_block, block, out_block, mean_block in blocks:  # block: (R, N), contiguous
                torch.mm(q_block, kt_h, out=block)
                softmax_(block)
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
    """`attend` as four batched ops (the path of other devices): same arguments and result."""
    probs = softmax_(torch.matmul(q, k.transpose(-2, -1), out=probs_out))
    if mean_out is not None:
        torch.mean(probs, dim=1, out=mean_out)
    return torch.matmul(probs, v).transpose(1, 2).contiguous()
