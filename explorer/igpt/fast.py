"""A faster decoder for big iGPTs: int8 weights and a bfloat16 key/value cache.

A decode step of a big iGPT reads every weight matrix and the whole key/value cache to
produce one token per sample, so its time is the bytes it reads. `fast_decoder(model)`
returns a copy that reads about a quarter of the weight bytes and half the cache bytes:

- every `Conv1D` and the head become PyTorch's dynamically quantised int8 `Linear`
  (per-output-channel int8 weights; each step's activations are quantised on the fly;
  FBGEMM kernels on x86);
- the cache is bfloat16 and one query's attention over it runs in
  `scaled_dot_product_attention` in bfloat16 (on this CPU twice as fast as fp32).

The copy's samples are not token-for-token those of the fp32 model; how much the
predictions move is measured as bits/dim (BENCHMARKS.md "iGPT sampler"). The fp32 model
stays the exact reference (`transformers`' `generate` equality holds for it, not for this).
Speed pays off for models whose weights do not fit in cache (iGPT-S and up); the tiny
offline model is bound by per-step overhead and gains nothing.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from explorer.igpt.model import Conv1D, ImageGPT

KV_DTYPE = torch.bfloat16


def _int8_linear(weight_in_out: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A dynamically quantised int8 Linear computing x @ weight_in_out (+ bias)."""
    from torch.ao.nn.quantized import dynamic as nnqd
    from torch.ao.quantization import per_channel_dynamic_qconfig

    n_in, n_out = weight_in_out.shape
    lin = nn.Linear(n_in, n_out, bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight_in_out.t())
        if bias is not None:
            lin.bias.copy_(bias)
    lin.qconfig = per_channel_dynamic_qconfig
    return nnqd.Linear.from_float(lin)


class Int8Conv1D(nn.Module):
    """`Conv1D` (x @ W + b, W stored (in, out)) with int8 weights."""

    def __init__(self, conv: Conv1D):
        super().__init__()
        self.linear = _int8_linear(conv.weight.detach().float(), conv.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def fast_decoder(model: ImageGPT) -> ImageGPT:
    """A copy of ``model`` (eval, CPU) with int8 weights and a bfloat16 key/value cache.

    Raises:
        RuntimeError: this PyTorch build has no int8 dynamic-quantisation engine.
    """
    if not torch.backends.quantized.supported_engines or \
            torch.backends.quantized.supported_engines == ["none"]:
        raise RuntimeError("This PyTorch build has no int8 quantisation engine.")
    first = next(model.parameters())
    if first.dtype != torch.float32 or first.device.type != "cpu":
        model = copy.deepcopy(model).float().cpu()  # Module.float() would change the caller's
    # Copy everything but the big matrices, which are shared until replaced below: no second
    # fp32 copy of the weights is ever held (iGPT-L's are 5.6 GB).
    big = [m for m in model.modules() if isinstance(m, Conv1D)] + [model.lm_head]
    memo = {id(p): p for m in big for p in m.parameters()}
    fast = copy.deepcopy(model, memo).eval()
    with warnings.catch_warnings():  # torch.ao's eager quantisation warns that it moves to torchao
        warnings.simplefilter("ignore")
        for block in fast.transformer.h:
            block.attn.c_attn = Int8Conv1D(block.attn.c_attn)
            block.attn.c_proj = Int8Conv1D(block.attn.c_proj)
            block.mlp.c_fc = Int8Conv1D(block.mlp.c_fc)
            block.mlp.c_proj = Int8Conv1D(block.mlp.c_proj)
        fast.lm_head = _int8_linear(fast.lm_head.weight.detach().t(), None)
    fast.kv_dtype = KV_DTYPE
    return fast
