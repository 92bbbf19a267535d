"""The compiled CPU backend of the capture: `explorer.kernels`' ``attend`` (attend.cpp).

One fused call per block does q kᵀ, softmax, the head mean and ``@ v`` in blocks of query
rows small enough to stay in L2, spread over the threads, and writes the full maps to memory
only when a buffer for them is passed. It runs only where `runs_on` says so (float32 CPU
tensors, the kernel built); everything else takes the plain-PyTorch path
(`explorer.attention.attend`). Why blocks in cache: see BENCHMARKS.md "Attention maps".
"""

from __future__ import annotations

import torch

from explorer import kernels

# Rows of one head's (N, N) map processed together: R * N floats ~ 512 KB, so the block is
# still in L2 when its softmax, head-mean share and `@ v` read it.
BLOCK_BYTES = 1 << 19


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the kernel is built (or can be) and takes CPU tensors of ``dtype``."""
    return dtype == torch.float32 and kernels.attend_op() is not None


def runs_on(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `attend` runs on these tensors: one CPU device, one dtype the kernel takes."""
    return (q.device.type == k.device.type == v.device.type == "cpu"
            and q.dtype == k.dtype == v.dtype and available(q.dtype))


def block_rows(batch: int, tokens: int, itemsize: int, threads: int) -> int:
    """Query rows per block: ~`BLOCK_BYTES` of map per block, and blocks in a multiple of the
    thread count (at least 3 per thread on small inputs) so no thread idles."""
    rows = max(1, min(tokens, BLOCK_BYTES // (tokens * itemsize)))
    blocks = min(tokens, max(-(-tokens // rows), -(-3 * threads // batch)))
    while (batch * blocks) % threads and blocks < tokens:
        blocks += 1
    return -(-tokens // blocks)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    probs_out: torch.Tensor | None = None,
    mean_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ) @ v by the compiled kernel; only where `runs_on` (q, k, v).

    Args and result as `explorer.attention.attend.attend`; ``probs_out`` None means the maps
    stay in cache and are never written to memory.
    """
    op = kernels.attend_op()
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1 and k.stride(-2) != 1:
        k = k.contiguous()
    rows = block_rows(q.shape[0], q.shape[2], q.element_size(), torch.get_num_threads())
    return op(q, k, v.contiguous(), probs_out, mean_out, rows)
