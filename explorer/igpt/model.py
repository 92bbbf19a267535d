"""A small, fast ImageGPT in plain PyTorch (nanoGPT-style), weight-compatible with transformers.

The module tree and parameter names match `transformers.ImageGPTForCausalImageModeling`, so a
state dict moves between the two with `load_state_dict(..., strict=True)` and no renaming:

    transformer.wte / transformer.wpe            token and position embeddings
    transformer.h.{i}.ln_1 / ln_2                ImageGPT's LayerNorm (see `ImageGPTLayerNorm`)
    transformer.h.{i}.attn.c_attn / c_proj       GPT-2 `Conv1D`: weight stored (in, out)
    transformer.h.{i}.mlp.c_fc / c_proj
    transformer.ln_f
    lm_head                                      (vocab_size - 1) outputs: no logit for start

What differs from transformers: attention goes through `F.scaled_dot_product_attention`
(transformers' ImageGPT is eager-only), and `forward_step` decodes one token against a
preallocated key/value cache written in place (no `torch.cat` per step; see `sampler.py`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class IGPTConfig:
    """Model hyper-parameters; field names follow `transformers.ImageGPTConfig`."""

    vocab_size: int = 513  # input vocabulary: palette colours + 1 start token (the last id)
    n_positions: int = 1024  # longest sequence: height * width (32*32 for OpenAI's)
    n_embd: int = 512  # residual stream width
    n_layer: int = 24
    n_head: int = 8
    n_inner: int | None = None  # MLP width; None = 4 * n_embd, as in GPT-2
    activation_function: str = "quick_gelu"  # OpenAI's iGPT: x * sigmoid(1.702 x)
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.0  # one rate for embeddings, attention and residuals (training only)

    @property
    def start_token(self) -> int:
        """The start-of-image token: the last input id (512 for OpenAI's checkpoints)."""
        return self.vocab_size - 1

    @property
    def n_colors(self) -> int:
        """Palette size = number of output logits (the start token is never predicted)."""
        return self.vocab_size - 1

    @classmethod
    def from_hf(cls, hf_config) -> IGPTConfig:
        """From a `transformers.ImageGPTConfig` (or its `to_dict()`)."""
        d = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        unsupported = [k for k in ("scale_attn_by_inverse_layer_idx", "add_cross_attention")
                       if d.get(k)]
        if unsupported or d.get("scale_attn_weights", True) is False:
            raise ValueError(f"ImageGPT options not supported here: {unsupported}")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["dropout"] = float(d.get("resid_pdrop", 0.0) or 0.0)
        return cls(**kw)

    def to_hf_dict(self) -> dict:
        """Arguments for `transformers.ImageGPTConfig(**...)`."""
        d = asdict(self)
        p = d.pop("dropout")
        d.update(resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, model_type="imagegpt",
                 architectures=["ImageGPTForCausalImageModeling"], tie_word_embeddings=False)
        return d


_ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class ImageGPTLayerNorm(nn.Module):
    """ImageGPT's "LayerNorm": divides by the root mean square, no centring and no bias.

    (OpenAI's iGPT code; transformers keeps it as `ImageGPTLayerNorm`.) It is RMSNorm.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * self.weight


class Conv1D(nn.Module):
    """GPT-2's linear layer: `y = x @ weight + bias`, weight stored (in, out) as in OpenAI's."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(
            *x.shape[:-1], -1)


class SharedPrefixKV:
    """One layer's key/value cache for samples that share their first positions.

    Completions of one image start from the same known pixels, so those keys and values are
    the same for every sample: they are kept once, (1, nh, P, hs), and each sample's own
    positions after them in (B, nh, T_max - P, hs). A step then reads the shared part once for
    the whole batch (one matrix product with B query rows per head) instead of once per
    sample: half the rows kept, 4 completions ran ~9% faster and 8 ~21% (BENCHMARKS.md).
    """

    def __init__(self, prefix: tuple[torch.Tensor, torch.Tensor], batch: int, length: int):
        self.k_pre, self.v_pre = prefix  # (1, nh, P, hs), filled by a batch-1 prefill
        _, nh, self.shared, hs = self.k_pre.shape
        shape = (batch, nh, length - self.shared, hs)
        self.k = self.k_pre.new_zeros(shape)
        self.v = self.k_pre.new_zeros(shape)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int) -> torch.Tensor:
        """q, k, v: (B, nh, 1, hs) for position `pos` >= the prefix -> (B, 1, nh * hs)."""
        n = pos - self.shared + 1  # own positions so far, this one included
        self.k[:, :, n - 1:n] = k
        self.v[:, :, n - 1:n] = v
        qh = q[:, :, 0].transpose(0, 1)  # (nh, B, hs)
        scores = torch.cat([qh @ self.k_pre[0].transpose(1, 2),  # (nh, B, P)
                            (q @ self.k[:, :, :n].transpose(-1, -2))[:, :, 0].transpose(0, 1)],
                           dim=-1) * (q.shape[-1] ** -0.5)  # (nh, B, P + n)
        w = scores.softmax(-1)
        own = (w[..., self.shared:].transpose(0, 1)[:, :, None] @ self.v[:, :, :n])[:, :, 0]
        y = w[..., :self.shared] @ self.v_pre[0] + own.transpose(0, 1)  # (nh, B, hs)
        return y.transpose(0, 1).reshape(q.shape[0], 1, -1)


def attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  cache: tuple[torch.Tensor, torch.Tensor], pos: int) -> torch.Tensor:
    """One query per sequence against a (k, v) cache, each (B, nh, T_max, hs): writes k, v
    (B, nh, 1, hs) at `pos` and attends over [0, pos] -> (B, 1, nh, hs)."""
    k_cache, v_cache = cache
    k_cache[:, :, pos:pos + 1] = k  # cast to the cache's dtype if it differs
    v_cache[:, :, pos:pos + 1] = v
    k, v = k_cache[:, :, :pos + 1], v_cache[:, :, :pos + 1]
    if k.dtype != q.dtype:  # reduced-precision cache (`fast.py`): fused, in its dtype
        return F.scaled_dot_product_attention(q.to(k.dtype), k, v).to(q.dtype).transpose(1, 2)
    # fp32: two batched GEMVs beat SDPA's flash kernel for a single query
    att = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)  # (B, nh, 1, t)
    return (att.softmax(-1) @ v).transpose(1, 2)


class GroupedKV:
    """One layer's caches for the rows of several completions, each group at its own position
    (`explorer.igpt.batch`'s PyTorch step): `parts` lists, in row order, each group's cache
    (a `SharedPrefixKV` or a (k, v) pair as `new_cache` makes) and the position of its token.
    The weight matrices run once for all rows; attention runs group by group."""

    def __init__(self, parts: list[tuple[SharedPrefixKV | tuple[torch.Tensor, torch.Tensor], int]]):
        self.parts = parts

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos=None) -> torch.Tensor:
        """q, k, v: (B, nh, 1, hs), the groups' rows in order -> (B, 1, nh * hs)."""
        out, row = [], 0
        for cache, at in self.parts:
            n = cache.k.shape[0] if isinstance(cache, SharedPrefixKV) else cache[0].shape[0]
            part = slice(row, row + n)
            if isinstance(cache, SharedPrefixKV):
                out.append(cache.attend(q[part], k[part], v[part], at))
            else:
                out.append(attend_cached(q[part], k[part], v[part], cache, at).reshape(n, 1, -1))
            row += n
        return torch.cat(out)


class Attention(nn.Module):
    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = Conv1D(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                pos: int = 0) -> torch.Tensor:
        """x: (B, T, C). With `cache` = (k, v), each (B, nh, T_max, hs), the new keys/values are
        written at positions [pos, pos + T) and attention reads [0, pos + T)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, -1).transpose(1, 2)
        v = v.view(B, T, self.n_head, -1).transpose(1, 2)
        causal = T > 1
        if cache is not None:
            if T > 1 and pos > 0:
                raise ValueError("multi-token steps after a prefix are not supported")
            if isinstance(cache, (SharedPrefixKV, GroupedKV)):  # one token per row, see there
                return self.c_proj(cache.attend(q, k, v, pos).reshape(B, T, C))
            if T == 1:  # one query per sequence against everything cached so far
                return self.c_proj(attend_cached(q, k, v, cache, pos).reshape(B, T, C))
            # a prefill block at position 0: its keys/values are stored (in the cache's
            # dtype) and attention is causal over them, fresh
            k_cache, v_cache = cache
            k_cache[:, :, :T] = k
            v_cache[:, :, :T] = v
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return F.dropout(self.c_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        inner = cfg.n_inner or 4 * cfg.n_embd
        self.c_fc = Conv1D(cfg.n_embd, inner)
        self.c_proj = Conv1D(inner, cfg.n_embd)
        self.act = _ACTIVATIONS[cfg.activation_function]
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.c_proj(self.act(self.c_fc(x))), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        self.ln_1 = ImageGPTLayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        self.attn = Attention(cfg)
        self.ln_2 = ImageGPTLayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, cache=None, pos: int = 0):
        x = x + self.attn(self.ln_1(x), cache, pos)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """Holds the body under the name `transformer`, as transformers' `ImageGPTModel` does."""

    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = ImageGPTLayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)


class ImageGPT(nn.Module):
    """Next-colour prediction over a raster-order token sequence that starts with the start token.

    `forward(idx)` takes (B, T) input ids (start token first) and returns (B, T, n_colors)
    logits: position t predicts the colour of pixel t.
    """

    kv_dtype: torch.dtype | None = None  # key/value cache dtype; None = the weights' dtype

    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.n_colors, bias=False)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (Conv1D, nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, caches: list | None = None, pos: int = 0) -> torch.Tensor:
        """idx: (B, T) input ids for positions [pos, pos + T) -> logits (B, T, n_colors).

        `caches`: one (k, v) pair per layer, each (B, nh, T_max, hs), filled in place.
        """
        T = idx.shape[1]
        if pos + T > self.config.n_positions:
            raise ValueError(f"sequence of {pos + T} > n_positions={self.config.n_positions}")
        tr = self.transformer
        x = tr.wte(idx) + tr.wpe.weight[pos:pos + T]  # (B, T, C)
        x = F.dropout(x, self.config.dropout, self.training)
        for i, block in enumerate(tr.h):
            x = block(x, None if caches is None else caches[i], pos)
        return self.lm_head(tr.ln_f(x))

    def decode_rows(self, idx: torch.Tensor, positions: torch.Tensor,
                    caches: list[GroupedKV]) -> torch.Tensor:
        """One token per row, each at its own position: idx, positions (B,) -> logits (B, V).

        `caches`: one `GroupedKV` per layer, whose groups cover the rows in order.
        """
        tr = self.transformer
        x = (tr.wte(idx) + tr.wpe(positions))[:, None]  # (B, 1, C)
        for block, cache in zip(tr.h, caches, strict=True):
            x = block(x, cache)
        return self.lm_head(tr.ln_f(x))[:, 0]

    def new_cache(self, batch: int, length: int | None = None) -> list[tuple[torch.Tensor, ...]]:
        """Preallocated key/value cache: n_layer pairs of (B, nh, length, hs) zeros
        (dtype `kv_dtype`)."""
        c = self.config
        length = length or c.n_positions
        p = self.transformer.wpe.weight
        dtype = self.kv_dtype or p.dtype
        shape = (batch, c.n_head, length, c.n_embd // c.n_head)
        return [(p.new_zeros(shape, dtype=dtype), p.new_zeros(shape, dtype=dtype))
                for _ in range(c.n_layer)]

    def shared_prefix_cache(self, prefix_cache: list, batch: int,
                            length: int) -> list[SharedPrefixKV]:
        """A cache for `batch` samples continuing one prefill: `prefix_cache` is a batch-1
        `new_cache(1, P)` filled with positions [0, P) (see `SharedPrefixKV`)."""
        return [SharedPrefixKV(kv, batch, length) for kv in prefix_cache]

    # ---- conversion to and from transformers -------------------------------------------------

    @classmethod
    def from_hf(cls, hf_model) -> ImageGPT:
        """Copy a `transformers.ImageGPTForCausalImageModeling` (same tensors, no renaming)."""
        model = cls(IGPTConfig.from_hf(hf_model.config))
        model.load_state_dict(hf_model.state_dict(), strict=True)
        return model.eval()

    def to_hf(self):
        """A `transformers.ImageGPTForCausalImageModeling` holding a copy of these weights."""
        from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

        hf = ImageGPTForCausalImageModeling(ImageGPTConfig(**self.config.to_hf_dict()))
        hf.load_state_dict(self.state_dict(), strict=True)
        return hf.eval()
