"""`AttentionMaps`: what one capture forward leaves for every attention view.

Full attention probabilities are not stored: they are computed on demand, one layer at a
time, from each block's kept q and k ((B, H, N, d) each, N/d times smaller than the layer's
(B, H, N, N) maps; writing all maps to fresh memory costs more than computing them again,
see BENCHMARKS.md "Attention maps"). The views need each layer once or only a few rows:

    >>> maps = capture(model, pixels)              # one forward, (B, 3, H, W) in
    >>> p = maps.probs(5)                          # (B, heads, N, N), a fresh tensor
    >>> cls_rows = maps.rows(5, [0])               # (B, heads, 1, N): only the rows asked for
    >>> for layer, p in maps.iter_probs():         # every layer once, one reused buffer
    ...     ...                                    # (clone p if you keep it)
    >>> everything = maps.stack()                  # (L, B, heads, N, N): all of it, big

Token order is timm's: prefix tokens first (class, then distillation or registers), then
patches row-major over ``maps.grid`` = (rows, cols). ``N = num_prefix_tokens + rows * cols``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from explorer.attention.attend import softmax_


@dataclass
class AttentionMaps:
    """Everything the attention views need from one forward pass.

    Attributes:
        q: per block, (B, heads, N, head_dim) queries as the attention used them, already
            multiplied by the softmax scale (1/sqrt(head_dim)); empty unless the capture kept
            them (`explorer.attention.capture.QueryKeys`): `probs` and `rows` need them.
        k: per block, (B, heads, N, head_dim) keys (empty like ``q``).
        grid: (rows, cols) of patch tokens for this input.
        patch_size: (height, width) of a patch in input pixels.
        num_prefix_tokens: class + distillation + register tokens before the patches.
        prefix_names: a name per prefix token: "CLS", "DIST", "REG1", ...
            (`explorer.patches.prefix_token_names`).
        has_class_token: whether token 0 is a class token (`explorer.patches.has_class_token`):
            a model with registers but no class token has prefix tokens and no class token.
        features: (B, N, D) output of ``model.forward_features`` (after the final norm).
        token_norms: (L, B, N) L2 norm of every token in the residual stream after each
            block (before the final norm): the high-norm "artifact" tokens show here.
        num_heads: attention heads per block.
        logits: (B, classes) for models with a classifier head, else None.
        head_mean: per block, (B, N, N) attention averaged over heads, if the capture kept it
            (`explorer.attention.capture.HeadMean`): the fast path of rollout.
        logit_bias: per block, a (heads, N, N) bias the model adds to q kᵀ before the softmax
            (a learned relative-position bias w_{i−j}, `explorer.lab.models.RelPosAttention`),
            or None for plain attention.
    """

    q: list[torch.Tensor]
    k: list[torch.Tensor]
    grid: tuple[int, int]
    patch_size: tuple[int, int]
    num_prefix_tokens: int
    prefix_names: list[str]
    has_class_token: bool
    features: torch.Tensor
    token_norms: torch.Tensor
    num_heads: int
    logits: torch.Tensor | None = None
    head_mean: list[torch.Tensor] | None = None
    logit_bias: list[torch.Tensor | None] | None = None

    def _biased(self, layer: int, scores: torch.Tensor,
                queries: torch.Tensor | None = None) -> torch.Tensor:
        """``scores`` (q kᵀ of ``layer``, all rows or the ``queries`` rows) plus the block's
        logit bias, in place; unchanged for plain attention."""
        bias = None if self.logit_bias is None else self.logit_bias[layer]
        if bias is None:
            return scores
        bias = bias.to(scores)
        return scores.add_(bias if queries is None else bias.index_select(1, queries))

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
            raise ValueError("These maps were captured without QueryKeys(): no q and k to "
                             "compute probabilities from; capture with QueryKeys().")
        dtype = self.token_norms.dtype  # compute in the capture's dtype (see `compact`)
        return self.q[layer].to(dtype), self.k[layer].to(dtype)

    def compact(self, dtype: torch.dtype = torch.float16) -> AttentionMaps:
        """A copy keeping q, k and the head means in ``dtype`` (float16: half the memory),
        for maps kept between events; computations upcast them back, one layer at a time.

        Display precision: float16 keeps ~3 significant digits of q, k and probabilities.
        """
        def cast(ts):
            return None if ts is None else [t.to(dtype) for t in ts]

        return dataclasses.replace(self, q=cast(self.q), k=cast(self.k),
                                   head_mean=cast(self.head_mean))

    def split(self, sizes: Sequence[int]) -> list[AttentionMaps]:
        """These maps cut along the batch into parts of ``sizes`` images (in order): what
        each caller of a shared forward gets back (`explorer.batching.MicroBatcher`)."""
        if sum(sizes) != self.batch_size:
            raise ValueError(f"sizes {list(sizes)} do not add up to the batch of {self.batch_size}")
        if len(sizes) == 1:
            return [self]
        parts, start = [], 0
        for n in sizes:
            # copies, not views: a caller's kept maps must not hold the whole batch's memory
            def take(t: torch.Tensor, dim: int = 0, a=start, b=start + n) -> torch.Tensor:
                return t.narrow(dim, a, b - a).clone()

            parts.append(dataclasses.replace(
                self, q=[take(t) for t in self.q], k=[take(t) for t in self.k],
                features=take(self.features), token_norms=take(self.token_norms, 1),
                logits=None if self.logits is None else take(self.logits),
                head_mean=None if self.head_mean is None else [take(t) for t in self.head_mean]))
            start += n
        return parts

    def token_index(self, row: int, col: int) -> int:
        """Token index of the patch at grid position (row, col)."""
        rows, cols = self.grid
        if not (0 <= row < rows and 0 <= col < cols):
            raise IndexError(f"Patch ({row}, {col}) is outside the {rows}x{cols} grid.")
        return self.num_prefix_tokens + row * cols + col

    def probs(self, layer: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention probabilities of one block: softmax(q kᵀ / sqrt(d) + bias).

        Args:
            layer: block index (negative counts from the end).
            out: optional (B, heads, N, N) float tensor to write into (saves the allocation,
                which for big maps costs more than the arithmetic).

        Returns:
            (B, heads, N, N); rows (queries) sum to 1.
        """
        q, k = self._qk(layer)
        return softmax_(self._biased(layer, torch.matmul(q, k.transpose(-2, -1), out=out)))

    def rows(self, layer: int, queries: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Only some query rows of `probs`: cheap (R x N per head instead of N x N).

        Returns:
            (B, heads, R, N) for R = len(queries).
        """
        q, k = self._qk(layer)
        index = torch.as_tensor(queries, dtype=torch.long, device=q.device)
        scores = torch.matmul(q.index_select(2, index), k.transpose(-2, -1))
        return self._biased(layer, scores, index).softmax(dim=-1)

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
