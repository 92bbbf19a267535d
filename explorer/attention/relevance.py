"""Class-specific relevance (Chefer et al. 2021, "Generic attention-model explainability")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from explorer.attention.capture import attention_modules, removing, this_thread_only
from explorer.patches import grid_for, has_class_token, patch_size


def _head_rows(model: nn.Module, num_prefix: int, n_tokens: int) -> list[int]:
    """Tokens the classifier head reads: class (and distillation) token, or all patches."""
    if getattr(model, "dist_token", None) is not None:  # DeiT: both heads, whatever the pool
        return [0, 1]
    if has_class_token(model) and getattr(model, "global_pool", "token") == "token":
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
        pixels: (B, 3, H, W) normalised input on the model's device.
        target: class index (or one per image); None = the predicted class.

    Returns:
        ``(relevance, target)``: (B, rows, cols) patch relevance from the tokens the head
        reads (class token, or the mean over patches for average-pooled models), and the
        (B,) class indices explained.
    """
    if not getattr(model, "num_classes", 0):
        raise ValueError("This model has no classifier head: fine-tune one to explain classes.")
    attns = attention_modules(model)
    L = len(attns)
    saved: dict[str, list] = {name: [None] * L for name in ("q", "k", "qkv", "out")}

    def keep(name, i):
        def hook(_module, args, output):
            saved[name][i] = args[0] if name == "out" else output

        return this_thread_only(hook)

    handles = []
    for i, attn in enumerate(attns):
        handles.append(attn.q_norm.register_forward_hook(keep("q", i)))
        handles.append(attn.k_norm.register_forward_hook(keep("k", i)))
        handles.append(attn.qkv.register_forward_hook(keep("qkv", i)))
        handles.append(attn.norm.register_forward_hook(keep("out", i)))  # its input is O
    pixels = pixels.detach().requires_grad_(True)  # a graph even if all weights are frozen
    with removing(handles), torch.enable_grad():
        logits = model(pixels)
        B = logits.shape[0]
        if target is None:
            target_t = logits.argmax(dim=-1)
        else:
            target_t = torch.as_tensor(target, dtype=torch.long, device=logits.device)
            target_t = target_t.reshape(-1).expand(B)
        score = logits.gather(1, target_t[:, None]).sum()
        grads = torch.autograd.grad(score, saved["out"])
    if any(x is None for x in saved["q"]):
        raise RuntimeError("Could not capture every block's attention for relevance.")

    with torch.no_grad():
        N = saved["q"][0].shape[2]
        R = torch.eye(N, dtype=logits.dtype, device=logits.device).expand(B, N, N)
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
        grid = grid_for(pixels.shape[-2:], patch_size(model))
    return rel.reshape(B, *grid), target_t.detach()
