"""The lab's four architectures, built from timm's parts, sized to ~0.2 M parameters each.

All take (B, 3, 28, 28) Fashion-MNIST pixels (the grey channel repeated, so every model is an
ordinary RGB timm model the other tabs can open) and give 10 logits:

- ``cnn``: a small VGG-style CNN from timm's `ConvNormAct` (locality, weight sharing, a
  2-D neighbourhood and translation equivariance built in);
- ``vit``: timm `VisionTransformer`, 4×4 patches (a 7×7 grid), learned absolute position
  embeddings;
- ``vit_rel``: the same ViT without position embeddings, a learned relative-position bias
  w_{i−j} added to every block's attention logits instead (`RelPosAttention`, timm's BEiT
  table `timm.layers.RelPosBias`): softmax(q·k + w_{i−j});
- ``coatnet``: CoAtNet in miniature, timm `MaxxVit` with an MBConv stage then a relative-
  attention stage (images upsampled ×2 inside the model so the attention stage sees a 7×7
  grid like the ViTs).

`build(arch, width=..., depth=...)` builds one; `LAB_ARCHS` lists the grid's architectures.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention, ConvNormAct, RelPosBias
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.maxxvit import MaxxVit, MaxxVitCfg, MaxxVitConvCfg, MaxxVitTransformerCfg
from timm.models.vision_transformer import VisionTransformer
from torch import nn

IMAGE_SIZE = 28
NUM_CLASSES = 10
# Fashion-MNIST's pixel statistics (train split, [0, 1] scale), repeated on three channels
MEAN = (0.2860,) * 3
STD = (0.3530,) * 3
PATCH = 4
POOL = "avg"  # ViTs classify the mean patch token (trains faster from scratch than the class token)

LAB_ARCHS = ("cnn", "vit", "vit_rel", "coatnet")
ARCH_LABELS = {
    "cnn": "CNN",
    "vit": "ViT (absolute positions)",
    "vit_rel": "ViT + relative bias",
    "coatnet": "CoAtNet (mini)",
}


# (width, depth) of each architecture in the grid: ~0.16-0.21 M parameters each
DEFAULT_SIZES = {"cnn": (24, 2), "vit": (64, 4), "vit_rel": (64, 4), "coatnet": (64, 3)}


@dataclass(frozen=True)
class ArchSpec:
    """One trainable architecture of the lab: which family, how wide, how deep."""

    arch: str
    width: int = 0  # 0: the architecture's grid default (`DEFAULT_SIZES`)
    depth: int = 0

    def __post_init__(self):
        if self.arch not in DEFAULT_SIZES:
            raise ValueError(f"Unknown lab architecture {self.arch!r}; choose from {LAB_ARCHS}.")
        width, depth = DEFAULT_SIZES[self.arch]
        object.__setattr__(self, "width", self.width or width)
        object.__setattr__(self, "depth", self.depth or depth)

    @property
    def name(self) -> str:
        return f"{self.arch}-w{self.width}-d{self.depth}"


class RelPosAttention(Attention):
    """timm `Attention` plus a learned relative-position bias on the logits (BEiT's table).

    softmax(q kᵀ / sqrt(d) + w_{i−j}) with one learned w per head and per 2-D offset i−j on
    the patch grid (a (2H−1)(2W−1) table; three more entries for the class token's rows and
    column). ``logit_bias()`` is the (heads, N, N) bias the attention views add to q kᵀ.
    """

    grid: tuple[int, int] = (IMAGE_SIZE // PATCH,) * 2  # the patch grid the table spans

    def __init__(self, dim: int, num_heads: int = 8, **kwargs):
        super().__init__(dim, num_heads=num_heads, **kwargs)
        self.rel_pos = RelPosBias(window_size=self.grid, num_heads=num_heads, prefix_tokens=1)

    def logit_bias(self) -> torch.Tensor:
        return self.rel_pos.get_bias()[0]  # (H, N, N)

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        if N * N != self.rel_pos.relative_position_index.numel():
            gh, gw = self.grid
            raise ValueError(f"This relative-position model takes a {gh}×{gw} patch grid "
                             f"({gh * PATCH}×{gw * PATCH} px) only.")
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = self.rel_pos.get_bias()  # (1, H, N, N)
        if attn_mask is not None:
            bias = bias + attn_mask
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype),
            dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(self.norm(x)))


def relative_table(attn: RelPosAttention) -> torch.Tensor:
    """The learned bias of each head as a (heads, 2H−1, 2W−1) image centred on the query:
    entry [h, H−1+dy, W−1+dx] is the bias towards a key dy patches below and dx patches right
    of its query. (BEiT's table is indexed by query − key; this flips it to key − query, so
    the image reads like the patch grid around the query.)"""
    gh, gw = attn.rel_pos.window_size
    table = attn.rel_pos.relative_position_bias_table[: (2 * gh - 1) * (2 * gw - 1)]
    return table.detach().t().reshape(-1, 2 * gh - 1, 2 * gw - 1).flip(-2, -1)


class SmallCNN(nn.Module):
    """Three stages of two 3×3 `ConvNormAct` each, 2×2 max-pool between, global average."""

    def __init__(self, width: int = 24, depth: int = 2, num_classes: int = NUM_CLASSES,
                 in_chans: int = 3):
        super().__init__()
        chans, layers = in_chans, []
        for stage, out in enumerate((width, 2 * width, 4 * width)):
            if stage:
                layers.append(nn.MaxPool2d(2))
            for _ in range(depth):
                layers.append(ConvNormAct(chans, out, 3))
                chans = out
        self.features = nn.Sequential(*layers)
        self.num_features = chans
        self.num_classes = num_classes
        self.head = nn.Linear(chans, num_classes)

    def forward_features(self, x):
        return self.features(x)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class UpsampledMaxxVit(MaxxVit):
    """timm `MaxxVit` that doubles its input's side first (28 px → 56 px), so the stem and
    one MBConv stage leave a 7×7 grid for the relative-attention stage."""

    def forward_features(self, x):
        return super().forward_features(F.interpolate(x, scale_factor=2, mode="nearest"))


def _lab_cfg() -> dict:
    return dict(url="", num_classes=NUM_CLASSES, input_size=(3, IMAGE_SIZE, IMAGE_SIZE),
                mean=MEAN, std=STD, interpolation="bilinear", crop_pct=1.0,
                first_conv="patch_embed.proj", classifier="head")


# timm reads this module-level name when `register_model` runs: define it first
default_cfgs = generate_default_cfgs({"lab_vit.untrained": _lab_cfg(),
                                      "lab_vit_rel.untrained": _lab_cfg()})


def _create_lab_vit(variant: str, pretrained: bool = False, relative: bool = False,
                    **kwargs) -> VisionTransformer:
    """timm's own builder (`build_model_with_cfg`), so ``timm.create_model`` and its
    ``local-dir:`` loader rebuild saved lab ViTs (`explorer.lab.grid`, the live run)."""
    width = kwargs.pop("embed_dim", 64)
    args = dict(img_size=IMAGE_SIZE, patch_size=PATCH, in_chans=3, num_classes=NUM_CLASSES,
                embed_dim=width, depth=4, num_heads=max(1, width // 16), mlp_ratio=4.0,
                global_pool=POOL, class_token=True)
    if relative:
        args.update(pos_embed="none", attn_layer=RelPosAttention)
        kwargs.pop("dynamic_img_size", None)  # the bias table spans one fixed grid
    args.update(kwargs)
    return build_model_with_cfg(VisionTransformer, variant, pretrained, **args)


@register_model
def lab_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The lab's ViT: 4-px patches on 28-px images, learned absolute position embeddings."""
    return _create_lab_vit("lab_vit", pretrained, relative=False, **kwargs)


@register_model
def lab_vit_rel(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The lab's ViT with a learned relative-position bias instead of position embeddings."""
    return _create_lab_vit("lab_vit_rel", pretrained, relative=True, **kwargs)


def _vit(width: int, depth: int, relative: bool) -> nn.Module:
    return timm.create_model("lab_vit_rel" if relative else "lab_vit",
                             embed_dim=width, depth=depth)


def build(spec: ArchSpec | str, seed: int | None = None) -> nn.Module:
    """A freshly initialised lab model (seeded when ``seed`` is given)."""
    if isinstance(spec, str):
        spec = ArchSpec(spec)
    if seed is not None:
        torch.manual_seed(seed)
    if spec.arch == "cnn":
        model = SmallCNN(width=spec.width, depth=spec.depth)
    elif spec.arch in ("vit", "vit_rel"):
        model = _vit(spec.width, spec.depth, relative=spec.arch == "vit_rel")
    elif spec.arch == "coatnet":
        cfg = MaxxVitCfg(
            embed_dim=(spec.width // 2, spec.width), depths=(1, spec.depth),
            block_type=("C", "T"), stem_width=(8, spec.width // 4),
            conv_cfg=MaxxVitConvCfg(expand_ratio=2.0),
            transformer_cfg=MaxxVitTransformerCfg(dim_head=16, rel_pos_type="bias"),
        )
        model = UpsampledMaxxVit(cfg, img_size=2 * IMAGE_SIZE, in_chans=3,
                                 num_classes=NUM_CLASSES)
    else:
        raise ValueError(f"Unknown lab architecture {spec.arch!r}; choose from {LAB_ARCHS}.")
    if spec.arch not in ("vit", "vit_rel"):
        model.pretrained_cfg = _lab_cfg()
    return model


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
