"""explorer.attention: the capture against timm's own attention, hand-derived maps, every
family and block layout, the model left as found, and no tensor off the input's device."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import timm
import torch
from timm.layers import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from timm.utils import AttentionExtract

from explorer import kernels
from explorer.attention import (
    VIEWS,
    AttentionMaps,
    EachLayer,
    HeadMean,
    QueryKeys,
    attention_rollout,
    capture,
    class_relevance,
    class_token_maps,
    cls_rollout_map,
    high_norm_tokens,
    mass_mask,
    native,
    patch_rollout_map,
    prefix_attention_share,
    query_maps,
    query_maps_all_layers,
)
from explorer.attention.attend import _attend_batched, attend
from explorer.attention.capture import _inline_ok, inline_attention
from explorer.models import load_vit
from explorer.ui.attention_view import attention_views, query_views
from tests.kernel_helpers import needs_compiler

TINY = dict(pretrained=False, embed_dim=64, depth=2, num_heads=2, dynamic_img_size=True)


def tiny(kind: str, **kwargs) -> torch.nn.Module:
    """Tiny random models of each family the catalogue holds (built in milliseconds)."""
    torch.manual_seed(0)
    if kind == "plain":
        model = timm.create_model("vit_small_patch16_224", img_size=64, **TINY, **kwargs)
    elif kind == "registers":  # DINOv2 layout: class + 4 registers, 14-px patches
        model = timm.create_model("vit_small_patch14_reg4_dinov2", img_size=56, **TINY, **kwargs)
    elif kind == "dinov2":
        model = timm.create_model("vit_small_patch14_dinov2", img_size=56, **TINY, **kwargs)
    elif kind == "distilled":
        model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=64, **TINY, **kwargs)
    elif kind == "qk_norm":
        model = timm.create_model(
            "vit_small_patch16_224", img_size=64, qk_norm=True, **TINY, **kwargs
        )
    else:
        raise ValueError(kind)
    # Random init makes attention nearly uniform; sharpen it so the checks mean something.
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(4.0)
    return model.eval()


@pytest.fixture(scope="module")
def default_model():
    """The offline default DINOv2 ViT-S/14 (converted from ONNX into the cache once)."""
    return load_vit(None)


KINDS = ["plain", "registers", "dinov2", "distilled", "qk_norm"]
PREFIX = {"plain": 1, "registers": 5, "dinov2": 1, "distilled": 2, "qk_norm": 1}


def eager_reference(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """softmax(QKᵀ/√d) from timm's own eager path (a copy with fused attention off)."""
    eager = copy.deepcopy(model)
    for blk in eager.blocks:
        blk.attn.fused_attn = False
    with torch.no_grad():
        out = AttentionExtract(eager, method="hook")(pixels)
    assert len(out) == len(model.blocks)
    return torch.stack(list(out.values()))  # (L, B, H, N, N)


class OtherAttention(Attention):
    """Not timm's own class (as any other attention module): the capture must fall back to
    the model's own forward, with hooks on q_norm/k_norm."""


def with_other_attention(model: torch.nn.Module) -> torch.nn.Module:
    other = copy.deepcopy(model)
    for blk in other.blocks:
        blk.attn.__class__ = OtherAttention
    return other


PATH_IDS = ["inline", "fallback"]


def on_path(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """The model as it is (inline capture) or with other attention modules (fallback)."""
    return model if path == "inline" else with_other_attention(model)


def hooks_of(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


@pytest.mark.parametrize("path", PATH_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_eager_reference(kind, path):
    model = tiny(kind)
    ph = model.patch_embed.patch_size[0]
    pixels = torch.randn(2, 3, 4 * ph, 3 * ph)  # batch of 2, non-square 4x3 grid
    maps = capture(on_path(model, path), pixels)
    ref = eager_reference(model, pixels)
    assert maps.grid == (4, 3)
    assert maps.num_prefix_tokens == PREFIX[kind]
    assert maps.num_tokens == PREFIX[kind] + 12
    stacked = maps.stack()
    assert stacked.shape == ref.shape == (2, 2, 2, maps.num_tokens, maps.num_tokens)
    torch.testing.assert_close(stacked, ref, atol=1e-5, rtol=0)
    assert (ref.amax(-1) > 1.5 / maps.num_tokens).any()  # the comparison is not of uniform maps


NATIVE = pytest.param(True, id="native", marks=needs_compiler)
PATHS = [NATIVE, pytest.param(False, id="torch-ops")]


@needs_compiler
def test_native_kernel_builds_where_a_compiler_exists():
    """Where a C++ compiler exists the kernel must build: a silent fallback would hide a
    regression that makes every capture slower (BENCHMARKS.md "Attention maps")."""
    assert kernels.attend_op() is not None, kernels.build_error()
    assert native.available(torch.float32)
    assert not native.available(torch.float64)  # float64 takes the PyTorch path


@pytest.mark.parametrize("native", PATHS)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("tokens", [50, 700], ids=["small", "row-blocks"])
def test_attend_matches_softmax_reference(tokens, threads, native):
    """Every CPU path (the kernel; PyTorch ops image by image / head by head in row blocks
    with a ragged last block) gives softmax(q kᵀ), its head mean and softmax(q kᵀ) @ v."""
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_attend(tokens, native)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("native", PATHS)
def test_batched_attend_path_matches_the_cpu_path(native):
    """The path other devices take (four batched ops), checked on the CPU."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 8) for _ in range(3))
    p1, p2 = torch.empty(2, 3, 40, 40), torch.empty(2, 3, 40, 40)
    m1, m2 = torch.empty(2, 40, 40), torch.empty(2, 40, 40)
    out = _attend_batched(q, k, v, p1, m1)
    torch.testing.assert_close(out, attend(q, k, v, p2, m2, use_native=native),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close((p1, m1), (p2, m2), atol=1e-6, rtol=0)
    assert out.shape == (2, 40, 3, 8) and out.is_contiguous()


def _check_attend(tokens, native, B=3, H=3, d=16):
    q, k, v = (torch.randn(B, H, tokens, d) for _ in range(3))
    probs, mean = torch.empty(B, H, tokens, tokens), torch.empty(B, tokens, tokens)
    out = attend(q, k, v, probs, mean, use_native=native)
    ref = (q @ k.transpose(-2, -1)).softmax(-1)
    torch.testing.assert_close(probs, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(mean, ref.mean(1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out, (ref @ v).transpose(1, 2), atol=1e-5, rtol=0)
    assert out.shape == (B, tokens, H, d) and out.is_contiguous()
    # without a probs buffer (the kernel never writes the maps): same output and head mean
    mean2 = torch.empty_like(mean)
    torch.testing.assert_close(attend(q, k, v, None, mean2, use_native=native), out,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(mean2, mean, atol=1e-6, rtol=0)


@pytest.mark.parametrize("native", PATHS)
def test_attend_takes_the_layouts_the_capture_uses(native):
    """k as a view of a (B, H, d, N) copy or of the qkv output, v strided as timm leaves it,
    odd token counts and head widths (vector tails)."""
    torch.manual_seed(1)
    B, N, H, d = 2, 37, 3, 24
    qkv = torch.randn(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q = q * d**-0.5
    ref = (q @ k.transpose(-2, -1)).softmax(-1)
    for keys in (k, k.transpose(-2, -1).contiguous().transpose(-2, -1)):
        probs, mean = torch.empty(B, H, N, N), torch.empty(B, N, N)
        out = attend(q, keys, v, probs, mean, use_native=native)
        torch.testing.assert_close(probs, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(mean, ref.mean(1), atol=1e-6, rtol=0)
        torch.testing.assert_close(out, (ref @ v).transpose(1, 2), atol=1e-5, rtol=0)


@needs_compiler
def test_kernel_writes_no_denormals_and_rows_still_sum_to_one():
    """Peaked rows: probabilities below exp(-75) of the row maximum come out as exact zeros
    (denormals would slow `@ v` several times); what is left still sums to 1 and matches."""
    q = torch.zeros(1, 1, 4, 2)
    q[0, 0, :, 0] = torch.tensor([0.0, 10.0, 50.0, 100.0])
    k = torch.zeros(1, 1, 4, 2)
    k[0, 0, :, 0] = torch.tensor([0.0, 1.0, 2.0, 3.0])  # logits differ by up to 300
    v = torch.randn(1, 1, 4, 2)
    probs = torch.empty(1, 1, 4, 4)
    attend(q, k, v, probs)
    ref = (q @ k.transpose(-2, -1)).softmax(-1)
    tiny = (probs > 0) & (probs < torch.finfo(torch.float32).tiny)
    assert not tiny.any()
    assert (ref[(ref > 0) & (ref < 3e-33)] > 0).any()  # the reference has such entries
    assert (probs[ref < 3e-33] == 0).all()
    torch.testing.assert_close(probs, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 1, 4), atol=1e-6, rtol=0)


def test_native_switch_off_gives_the_same_maps(monkeypatch):
    """EXPLORER_NATIVE=0 (or no compiler) takes the PyTorch-ops path: same maps and means."""
    model = tiny("registers")
    pixels = torch.randn(2, 3, 56, 70)
    compiled = capture(model, pixels)
    monkeypatch.setenv("EXPLORER_NATIVE", "0")
    assert not native.available()
    plain = capture(model, pixels)
    torch.testing.assert_close(compiled.stack(), plain.stack(), atol=1e-6, rtol=0)
    torch.testing.assert_close(compiled.head_mean, plain.head_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(compiled.features, plain.features, atol=1e-5, rtol=0)


def test_large_grid_uses_row_blocks_and_matches_eager():
    """A 27x27 grid (730 tokens, 4.3 MB of maps per image) goes through the row-block path."""
    model = tiny("plain")
    pixels = torch.randn(1, 3, 27 * 16, 27 * 16)
    maps = capture(model, pixels)
    ref = eager_reference(model, pixels)
    torch.testing.assert_close(maps.stack(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(maps.head_mean[1], ref[1].mean(1), atol=1e-6, rtol=0)


def test_model_left_as_found():
    model = tiny("registers")
    pixels = torch.randn(1, 3, 56, 42)
    with torch.no_grad():
        before = model(pixels)
    for path in PATH_IDS:
        captured = on_path(model, path)
        capture(captured, pixels)
        assert hooks_of(captured) == 0
        assert all("forward" not in vars(blk.attn) for blk in captured.blocks)  # no patch left
    assert all(blk.attn.fused_attn for blk in model.blocks)  # still the fused path
    assert not model.training
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), before, atol=0, rtol=0)


def test_leaves_hooks_removed_after_error():
    model = tiny("plain")
    with pytest.raises(RuntimeError):
        capture(model, torch.randn(1, 1, 64, 64))  # 1 channel: fails inside forward
    assert hooks_of(model) == 0
    with pytest.raises(ValueError, match="multiple of the 16x16 patch"):
        capture(model, torch.randn(1, 3, 64, 60))


def test_eval_and_relevance_do_not_touch_parameters():
    model = tiny("plain", num_classes=5)
    pixels = torch.randn(1, 3, 64, 64)
    class_relevance(model, pixels)
    assert all(p.grad is None for p in model.parameters())
    assert hooks_of(model) == 0


class EarlyExitViT(VisionTransformer):
    """A ViT whose features come from all but its last block (as some feature extractors do)."""

    def forward_features(self, x, attn_mask=None, is_causal=False):
        x = self._pos_embed(self.patch_embed(x))
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.norm(x)


def test_raises_when_fewer_maps_than_blocks():
    model = EarlyExitViT(img_size=32, patch_size=16, embed_dim=32, depth=3, num_heads=2,
                         num_classes=0, dynamic_img_size=True).eval()
    with pytest.raises(RuntimeError, match="2 blocks, but the model has 3"):
        capture(model, torch.randn(1, 3, 32, 32))
    assert hooks_of(model) == 0


def test_distillation_token_is_a_prefix():
    model = tiny("distilled")
    assert isinstance(model, VisionTransformerDistilled)
    pixels = torch.randn(1, 3, 48, 64)
    maps = capture(model, pixels)
    assert maps.prefix_names == ["CLS", "DIST"] and maps.has_class_token
    assert maps.token_index(0, 0) == 2
    share = prefix_attention_share(maps)
    ref = eager_reference(model, pixels)  # (L, B, H, 14, 14): 2 prefix + 3x4 patches
    expected = ref[:, :, :, 2:, :2].mean(dim=(2, 3))  # over heads and patch queries
    torch.testing.assert_close(share, expected, atol=1e-6, rtol=0)
    # class + distillation + patches = 1 for every patch query
    patches = ref[:, :, :, 2:, 2:].sum(-1).mean(dim=(2, 3))
    torch.testing.assert_close(share.sum(-1) + patches, torch.ones(2, 1), atol=1e-6, rtol=0)


def test_registers_prefix_share_matches_direct_sum():
    model = tiny("registers")
    pixels = torch.randn(1, 3, 42, 56)
    maps = capture(model, pixels)
    assert maps.prefix_names == ["CLS"] + [f"REG{i}" for i in range(1, 5)]
    share = prefix_attention_share(maps)
    ref = eager_reference(model, pixels)
    expected = ref[:, :, :, 5:, :5].mean(dim=(2, 3))  # (L, B, 5): over heads, patch queries
    torch.testing.assert_close(share, expected, atol=1e-6, rtol=0)
    assert (share.sum(-1) < 1).all() and (share >= 0).all()
    # read from the kept head means above; from maps recomputed out of q and k without them
    no_means = capture(model, pixels, [QueryKeys()])
    assert no_means.head_mean is None
    torch.testing.assert_close(prefix_attention_share(no_means), expected, atol=1e-6, rtol=0)


def test_capture_can_keep_float16_block_by_block():
    model = tiny("registers")
    pixels = torch.randn(1, 3, 42, 56)
    full = capture(model, pixels)
    half = capture(model, pixels, keep_dtype=torch.float16)
    expected = full.compact()
    for name in ("q", "k", "head_mean"):
        for got, want in zip(getattr(half, name), getattr(expected, name), strict=True):
            assert got.dtype == torch.float16 and torch.equal(got, want)
    assert half.features.dtype == torch.float32  # only what is kept between events shrinks
    torch.testing.assert_close(prefix_attention_share(half), prefix_attention_share(full),
                               atol=1e-3, rtol=0)


def test_rows_and_query_maps_match_full_probs():
    model = tiny("qk_norm")
    maps = capture(model, torch.randn(2, 3, 48, 80))  # 3x5 grid
    full = maps.probs(1)
    idx = maps.token_index(2, 4)
    assert idx == 1 + 2 * 5 + 4
    torch.testing.assert_close(maps.rows(1, [0, idx]), full[:, :, [0, idx]], atol=1e-6, rtol=0)
    qm = query_maps(maps, 1, idx)
    assert qm.shape == (2, 2, 3, 5)
    torch.testing.assert_close(qm.flatten(-2), full[:, :, idx, 1:], atol=1e-6, rtol=0)
    every = query_maps_all_layers(maps, idx)
    assert every.shape == (2, 2, 2, 3, 5)
    stack = maps.stack()
    torch.testing.assert_close(every.flatten(-2), stack[:, :, :, idx, 1:], atol=1e-6, rtol=0)


def test_compact_maps_halve_the_bytes_and_give_the_same_views():
    from explorer.cache import tensor_bytes

    maps = capture(tiny("registers"), torch.randn(1, 3, 42, 70))  # 3x5 patches of 14 px
    small = maps.compact()
    kept = [*maps.q, *maps.k, *maps.head_mean]
    assert tensor_bytes(maps) - tensor_bytes(small) == tensor_bytes(kept) // 2
    assert small.q[0].dtype == torch.float16 and small.probs(1).dtype == torch.float32
    for fusion in ("mean", "max"):
        full, half = (attention_views(m, 1, fusion, fusion, 0.0, 0, 0.6) for m in (maps, small))
        for name in ("heads", "per_layer", "rollout", "norms"):
            torch.testing.assert_close(getattr(half, name), getattr(full, name), atol=2e-3, rtol=0)
    torch.testing.assert_close(query_views(small, 1, 2, 1)[1], query_views(maps, 1, 2, 1)[1],
                               atol=2e-3, rtol=0)


def test_probs_rows_sum_to_one_and_iter_reuses_buffer():
    maps = capture(tiny("plain"), torch.randn(1, 3, 32, 64))
    seen = []
    for layer, p in maps.iter_probs():
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))
        seen.append((layer, p.data_ptr()))
    assert [s[0] for s in seen] == [0, 1] and seen[0][1] == seen[1][1]
    assert isinstance(maps, AttentionMaps) and maps.token_norms.shape == (2, 1, 9)


def eager_relevance(model, pixels, target, head_rows):
    """Chefer et al.'s relevance by autograd on the eager model's materialised attention."""
    eager = copy.deepcopy(model)
    attn_probs = []
    for blk in eager.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda _m, _a, out: attn_probs.append(out))
    logits = eager(pixels)
    score = logits.gather(1, torch.as_tensor(target).reshape(-1, 1)).sum()
    grads = torch.autograd.grad(score, attn_probs)
    B, N = pixels.shape[0], attn_probs[0].shape[-1]
    R = torch.eye(N).expand(B, N, N)
    for a, g in zip(attn_probs, grads, strict=True):
        R = R + (g * a).clamp(min=0).mean(dim=1) @ R
    p = model.num_prefix_tokens
    return R[:, head_rows, p:].mean(dim=1).detach()


def test_class_relevance_of_a_distilled_model_reads_both_tokens():
    model = tiny("distilled", num_classes=4)
    pixels = torch.randn(2, 3, 32, 48)
    rel, target = class_relevance(model, pixels, target=3)
    assert rel.shape == (2, 2, 3) and target.tolist() == [3, 3]
    expected = eager_relevance(model, pixels, [3, 3], head_rows=[0, 1])  # CLS and DIST
    torch.testing.assert_close(rel.flatten(-2), expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="no classifier head"):
        class_relevance(tiny("plain", num_classes=0), torch.randn(1, 3, 32, 32))


def test_class_relevance_gradient_matches_eager_autograd():
    """The chain rule ∂y/∂A = (∂y/∂O) Vᵀ gives the same relevance as autograd on eager A."""
    model = tiny("plain", num_classes=3)
    pixels = torch.randn(1, 3, 32, 48)
    rel, target = class_relevance(model, pixels)
    expected = eager_relevance(model, pixels, target, head_rows=[0])
    torch.testing.assert_close(rel.flatten(-2), expected, atol=1e-5, rtol=1e-4)


def test_mass_mask_keeps_share_of_mass():
    w = torch.tensor([0.5, 0.05, 0.3, 0.15])
    assert mass_mask(w, 0.6).tolist() == [True, False, True, False]  # 0.5 < 0.6, +0.3 reaches
    assert mass_mask(w, 0.5).tolist() == [True, False, False, False]
    assert mass_mask(w, 1.0).all()


def test_high_norm_tokens_flags_outliers():
    norms = torch.tensor([[9.0, 1.0, 1.1, 0.9, 5.0, 1.0]])  # prefix 9.0 is ignored
    assert high_norm_tokens(norms, 1).tolist() == [[False, False, False, True, False]]


def eager_per_layer(model: torch.nn.Module, pixels: torch.Tensor, reductions=VIEWS):
    """`capture` plus each layer's softmax(q kᵀ / √d) computed the eager way from the
    very input that layer saw in that capture: (maps, (L, B, H, N, N) reference)."""
    inputs = {}
    handles = [blk.attn.register_forward_pre_hook(
        lambda _m, args, i=i: inputs.__setitem__(i, args[0])) for i, blk in enumerate(model.blocks)]
    try:
        maps = capture(model, pixels, reductions)
    finally:
        for h in handles:
            h.remove()
    refs = []
    with torch.no_grad():
        for i, blk in enumerate(model.blocks):
            attn, x = blk.attn, inputs[i]
            B, N, _ = x.shape
            q, k, _v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(q) * attn.scale, attn.k_norm(k)
            refs.append((q @ k.transpose(-2, -1)).softmax(-1))
    return maps, torch.stack(refs)


def test_offline_default_model_maps(default_model, monkeypatch):
    model, _ = default_model
    pixels = torch.randn(1, 3, 14 * 6, 14 * 9)
    maps, per_layer = eager_per_layer(model, pixels)
    assert maps.grid == (6, 9) and maps.num_layers == 12 and maps.num_heads == 6
    # every layer's maps are softmax(q kᵀ/√d) of what that layer saw
    torch.testing.assert_close(maps.stack(), per_layer, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.stack(maps.head_mean), per_layer.mean(2), atol=1e-6, rtol=0)
    handed = []  # what EachLayer gets: the maps the capture forward itself computed
    _, per_layer = eager_per_layer(model, pixels, [EachLayer(lambda _l, p: handed.append(p.clone()))])
    torch.testing.assert_close(torch.stack(handed), per_layer, atol=1e-6, rtol=0)
    ref = eager_reference(model, pixels)
    # Against a separate eager forward, deeper layers inherit fp32 rounding differences in
    # the residual stream: ~1e-5 at layer 4 for the compiled kernel, the same as timm's own
    # fused forward (below); the PyTorch-ops path reproduces the eager forward exactly.
    torch.testing.assert_close(maps.stack(), ref, atol=5e-5, rtol=0)
    monkeypatch.setenv("EXPLORER_NATIVE", "0")
    torch.testing.assert_close(capture(model, pixels).stack(), ref, atol=1e-6, rtol=0)
    monkeypatch.delenv("EXPLORER_NATIVE")
    # On the fallback path the model runs its own fused attention: layer 0 sees identical
    # inputs; deeper layers inherit fp32 rounding differences of fused vs eager.
    fused = capture(with_other_attention(model), pixels)
    torch.testing.assert_close(fused.probs(0), ref[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(fused.stack(), ref, atol=5e-5, rtol=0)
    assert hooks_of(model) == 0 and all(blk.attn.fused_attn for blk in model.blocks)


def test_offline_default_model_matches_eager_in_float64(default_model):
    """In float64 the two paths agree far below 1e-5: the formula is the eager one exactly."""
    model = copy.deepcopy(default_model[0]).double()
    pixels = torch.randn(1, 3, 14 * 5, 14 * 4, dtype=torch.float64)
    maps = capture(model, pixels)
    torch.testing.assert_close(maps.stack(), eager_reference(model, pixels), atol=1e-9, rtol=0)


def test_attention_views_and_plots_for_one_image():
    import numpy as np
    from matplotlib import colormaps

    from explorer.plots import attention as plots
    from explorer.plots import colors

    model = tiny("registers")
    maps = capture(model, torch.randn(1, 3, 42, 70))  # 3x5 grid, 5 prefix tokens
    stack = maps.stack()[:, 0]  # (L, H, N, N) of image 0
    v = attention_views(maps, layer=1, head_fusion="max", keep=0.5)
    torch.testing.assert_close(v.heads, stack[1, :, 0, 5:].view(2, 3, 5))  # class-token rows
    torch.testing.assert_close(v.fused, v.heads.amax(0))
    torch.testing.assert_close(v.per_layer, stack[:, :, 0, 5:].amax(1).view(2, 3, 5))
    rollout = attention_rollout(stack)  # (N, N), from the full maps
    torch.testing.assert_close(v.rollout, rollout[0, 5:].view(3, 5), atol=1e-6, rtol=0)
    torch.testing.assert_close(v.masks, mass_mask(v.heads.flatten(-2), 0.5).view(2, 3, 5))
    torch.testing.assert_close(v.norms, maps.token_norms[1, 0])
    torch.testing.assert_close(v.high_norm, high_norm_tokens(maps.token_norms[1, 0], 5))
    torch.testing.assert_close(v.prefix_share, stack[:, :, 5:, :5].mean(dim=(1, 2)),
                               atol=1e-6, rtol=0)
    in_layer, all_layers = query_views(maps, 2, 4, layer=0, head=1)
    idx = 5 + 2 * 5 + 4
    torch.testing.assert_close(in_layer, stack[0, 1, idx, 5:].view(3, 5), atol=1e-6, rtol=0)
    torch.testing.assert_close(all_layers, stack[:, 1, idx, 5:].view(2, 3, 5), atol=1e-6, rtol=0)
    _, fused_layers = query_views(maps, 2, 4, layer=0, head="mean")
    torch.testing.assert_close(fused_layers, stack[:, :, idx, 5:].mean(1).view(2, 3, 5),
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="head"):
        query_views(maps, 0, 0, layer=0, head=7)
    with pytest.raises(IndexError, match="outside"):
        query_views(maps, 3, 0, layer=0)

    # The pictures, by hand, over a flat grey photo: a map's largest patch shows the colour
    # map's top blended 60% over the grey, its smallest the bottom (inferno: near black).
    image = np.full((42, 70, 3), 128, np.uint8)
    top, bottom = (np.array(colormaps["inferno"](x)[:3]) * 255 for x in (1.0, 0.0))
    lit, dark = (0.4 * 128 + 0.6 * c for c in (top, bottom))

    def near(pixel, colour) -> bool:  # uint8 rounding apart
        return np.abs(pixel.astype(float) - colour).max() <= 1.5

    def cell_centre(tile_x, tile_y, tile_h, tile_w, cell):  # pixel at a patch's centre
        (r, c), (rows, cols) = cell, (3, 5)
        return tile_y + int((r + 0.5) * tile_h / rows), tile_x + int((c + 0.5) * tile_w / cols)

    grid = plots.head_grid(image, v.heads, v.fused, "max", 1)
    gap = 2
    tile_h, tile_w = round(42 * plots.TILE / 70), plots.TILE  # the longer side is TILE px
    label_h = colors.caption_layout(["L2 head 1", "L2 head 2", "L2 max"], tile_w, tile_h)[1]
    assert grid.shape == (gap + tile_h + label_h + gap, 3 * (tile_w + gap) + gap, 3)
    for i, heat in enumerate([*v.heads, v.fused]):  # head 1, head 2, then the fused map
        x = gap + i * (tile_w + gap)
        hottest = divmod(int(heat.argmax()), 5)
        coldest = divmod(int(heat.argmin()), 5)
        assert near(grid[cell_centre(x, gap, tile_h, tile_w, hottest)], lit), i
        assert near(grid[cell_centre(x, gap, tile_h, tile_w, coldest)], dark), i
        label = grid[gap + tile_h: gap + tile_h + label_h, x: x + tile_w]
        assert (label < 100).any()  # the tile's label, under it, in dark text

    boxed = plots.heat_overlay(image, v.rollout, cell=(1, 2))  # 14x14 px cells
    assert (boxed[14, 28:42] == (0, 255, 255)).all()  # the clicked patch's top edge: cyan
    assert not (boxed[13, 28:42] == (0, 255, 255)).all(-1).any()  # nothing above it
    plain = plots.heat_overlay(image, v.rollout)
    hottest = divmod(int(v.rollout.argmax()), 5)
    assert near(plain[hottest[0] * 14 + 7, hottest[1] * 14 + 7], lit)

    masks = plots.mask_grid(image, v.masks, 0.5, 1)
    for h in range(2):  # a kept patch shows the photo, a dropped one a quarter of it
        x = gap + h * (tile_w + gap)
        for cell in ((r, c) for r in range(3) for c in range(5)):
            want = 128 if bool(v.masks[h][cell]) else 32
            assert (masks[cell_centre(x, gap, tile_h, tile_w, cell)] == want).all(), (h, cell)

    share = plots.prefix_share_figure(v.prefix_share, maps.prefix_names)
    assert [t.name for t in share.data] == [*maps.prefix_names, "all patches"]  # CLS, REG1..4
    for j, trace in enumerate(share.data[:-1]):
        np.testing.assert_allclose(trace.y, v.prefix_share[:, j].numpy(), rtol=1e-6)
    np.testing.assert_allclose(share.data[-1].y, 1 - v.prefix_share.sum(1).numpy(), rtol=1e-5)
    assert list(share.data[0].x) == [1, 2]  # layers, 1-based
    figure = plots.token_norm_figure(v.norms, maps.prefix_names, v.norm_threshold, 1)
    assert figure.layout.shapes[0].x0 == pytest.approx(float(v.norm_threshold))
    np.testing.assert_allclose(figure.data[0].x, v.norms[5:].numpy())  # patch tokens only
    assert [s.x0 for s in figure.layout.shapes[1:]] == pytest.approx(v.norms[:5].tolist())


def test_class_token_maps_without_class_token():
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, embed_dim=32,
                              depth=1, num_heads=2, class_token=False, global_pool="avg",
                              dynamic_img_size=True).eval()
    maps = capture(model, torch.randn(1, 3, 32, 48))
    assert maps.num_prefix_tokens == 0 and maps.prefix_names == [] and not maps.has_class_token
    received = class_token_maps(maps, 0)
    torch.testing.assert_close(received.flatten(-2), maps.probs(0).mean(dim=2))


@pytest.mark.parametrize("path", PATH_IDS)
def test_each_layer_sees_every_layer_once_in_order_and_head_mean_is_kept(path):
    model = on_path(tiny("registers"), path)
    pixels = torch.randn(2, 3, 42, 56)
    seen = []
    maps = capture(model, pixels, [*VIEWS, EachLayer(
        lambda layer, p: seen.append((layer, p.sum(-1).clone())))])
    assert [layer for layer, _ in seen] == [0, 1]
    torch.testing.assert_close(seen[1][1], torch.ones(2, 2, 17))
    torch.testing.assert_close(maps.head_mean[1], maps.probs(1).mean(dim=1))
    assert capture(model, pixels, [QueryKeys()]).head_mean is None
    assert capture(model, pixels, [HeadMean()]).q == []


@pytest.mark.parametrize("path", PATH_IDS)
def test_each_layer_alone_keeps_no_q_and_k(path):
    model = tiny("dinov2")
    pixels = torch.randn(2, 3, 42, 56)
    ref = capture(model, pixels)
    seen = []
    maps = capture(on_path(model, path), pixels, [EachLayer(lambda layer, p: seen.append(p.clone()))])
    assert maps.q == [] and maps.k == [] and maps.head_mean is None
    assert (maps.num_layers, maps.batch_size, maps.num_heads, maps.num_tokens) == (2, 2, 2, 13)
    torch.testing.assert_close(torch.stack(seen), ref.stack(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="QueryKeys"):
        maps.probs(0)


def test_other_threads_run_the_ordinary_forward_during_capture():
    """While one thread captures, another thread's forward through the same model is the
    model's own (fused) forward and records nothing into the capture."""
    import threading

    model = tiny("plain")
    x_other = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x_other)
    results = {}

    def other():
        with torch.no_grad():
            results["other"] = model(x_other)

    def consumer(layer, _p):
        if layer == 0:  # mid-capture: run a forward from another thread
            t = threading.Thread(target=other)
            t.start()
            t.join()

    maps = capture(model, torch.randn(2, 3, 64, 48), [*VIEWS, EachLayer(consumer)])
    torch.testing.assert_close(results["other"], expected, atol=0, rtol=0)
    assert maps.batch_size == 2 and maps.grid == (4, 3)


# ---------------------------------------------------------------------------------------
# timm's Attention under us, hand-derived maps, models without a class token, devices
# ---------------------------------------------------------------------------------------

BLOCK_CONFIGS = {
    "qkv_bias": dict(qkv_bias=True),
    "no_qkv_bias": dict(qkv_bias=False),
    "qk_norm": dict(qk_norm=True),
    "registers": dict(reg_tokens=4),
    "no_class_token": dict(class_token=False, global_pool="avg"),
    "registers_no_class_token": dict(reg_tokens=2, class_token=False, global_pool="avg"),
}
# What `inline_attention` computes with: a submodule timm adds is a change to check first.
INLINE_SUBMODULES = {"qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize("config", list(BLOCK_CONFIGS))
def test_inline_path_matches_timms_own_attention_forward(config, fused):
    """Our copy of timm's `Attention.forward` against timm's own, block by block, on the
    inputs each block sees: if timm's `Attention` changes under us, this fails loudly."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=48, patch_size=16, embed_dim=64, depth=2, num_heads=4,
                              num_classes=0, dynamic_img_size=True, **BLOCK_CONFIGS[config])
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(4.0)  # peaked maps, not nearly uniform ones
    model.eval()
    inputs, probs_ref = {}, {}
    for i, blk in enumerate(model.blocks):
        blk.attn.fused_attn = fused
        blk.attn.register_forward_pre_hook(lambda _m, args, i=i: inputs.__setitem__(i, args[0]))
        blk.attn.attn_drop.register_forward_hook(
            lambda _m, _a, out, i=i: probs_ref.__setitem__(i, out))
    with torch.no_grad():
        model(torch.randn(2, 3, 48, 64))
    for i, blk in enumerate(model.blocks):
        attn, x = blk.attn, inputs[i]
        assert type(attn) is Attention and _inline_ok(attn)
        assert set(dict(attn.named_children())) == INLINE_SUBMODULES, (
            "timm's Attention has new parts: check inline_attention against its forward")
        B, N, _ = x.shape
        probs, mean = torch.empty(B, 4, N, N), torch.empty(B, N, N)
        with torch.no_grad():
            ours, q, k = inline_attention(attn, x, probs, mean)
            theirs = attn(x)  # timm's own forward, fused or eager as configured
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(probs.sum(-1), torch.ones(B, 4, N))
        torch.testing.assert_close(mean, probs.mean(1))
        if not fused:  # timm's eager path materialises its probabilities: the same
            torch.testing.assert_close(probs, probs_ref[i], atol=1e-6, rtol=0)


def test_training_mode_and_gated_attention_take_the_fallback():
    model = tiny("plain")
    assert all(_inline_ok(blk.attn) for blk in model.blocks)
    model.train()
    assert not any(_inline_ok(blk.attn) for blk in model.blocks)
    gated = Attention(dim=64, num_heads=2, gated=True).eval()
    assert not _inline_ok(gated)
    assert not _inline_ok(OtherAttention(dim=64, num_heads=2).eval())


def zero_qk(model: torch.nn.Module) -> torch.nn.Module:
    """q = k = 0 in every block: every attention map is uniform, 1/N."""
    with torch.no_grad():
        for blk in model.blocks:
            H, d = blk.attn.num_heads, blk.attn.head_dim
            blk.attn.qkv.weight[: 2 * H * d].zero_()
            if blk.attn.qkv.bias is not None:
                blk.attn.qkv.bias[: 2 * H * d].zero_()
    return model


@pytest.mark.parametrize("path", PATH_IDS)
def test_uniform_attention_by_hand(path):
    """Uniform maps (q = k = 0), 3 layers, class + 2 registers, a non-square 3x5 grid:
    every probability is 1/N, each prefix token gets 1/N of every patch's attention, and
    rollout is 0.5^L I + (1 - 0.5^L)/N (uniform U is idempotent), so the class token's
    rollout to each patch is (1 - 1/8)/N."""
    torch.manual_seed(0)
    model = zero_qk(VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=3,
                                      num_heads=2, reg_tokens=2, num_classes=0,
                                      dynamic_img_size=True)).eval()
    maps = capture(on_path(model, path), torch.randn(1, 3, 48, 80))
    N = 3 + 15
    assert maps.grid == (3, 5) and maps.num_tokens == N and maps.prefix_names == ["CLS", "REG1", "REG2"]
    uniform = torch.full((3, 1, 2, N, N), 1 / N)
    torch.testing.assert_close(maps.stack(), uniform)
    torch.testing.assert_close(torch.stack(maps.head_mean), uniform[:, :, 0])
    torch.testing.assert_close(prefix_attention_share(maps), torch.full((3, 1, 3), 1 / N))
    torch.testing.assert_close(query_maps(maps, 2, maps.token_index(2, 4)),
                               torch.full((1, 2, 3, 5), 1 / N))
    expected = 0.125 * torch.eye(N) + 0.875 / N
    torch.testing.assert_close(attention_rollout(maps)[0], expected)
    torch.testing.assert_close(attention_rollout(maps, "max", rows=[0])[0], expected[[0]])
    torch.testing.assert_close(cls_rollout_map(maps), torch.full((1, 3, 5), 0.875 / N))
    # patch queries: their own 1/8 + (7/8)/N spread evenly, so the mean is uniform again
    torch.testing.assert_close(patch_rollout_map(maps),
                               torch.full((1, 3, 5), 0.875 / N + 0.125 / 15))


def test_registers_without_a_class_token_are_not_read_as_one():
    """A model with a register but no class token: its register's rollout row must not be
    shown as the class token's; the views use the patches' mean rollout and the attention
    patches receive, and relevance reads the patches (average pooling)."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                              reg_tokens=1, class_token=False, global_pool="avg", num_classes=3,
                              dynamic_img_size=True)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(4.0)
    model.eval()
    pixels = torch.randn(1, 3, 32, 48)  # 2x3 grid, 1 register
    maps = capture(model, pixels)
    assert maps.prefix_names == ["REG1"] and maps.num_prefix_tokens == 1
    assert not maps.has_class_token
    with pytest.raises(ValueError, match="no class token"):
        cls_rollout_map(maps)
    stack = maps.stack()[:, 0]  # (L, H, 7, 7)
    full = attention_rollout(stack)
    v = attention_views(maps, layer=1)
    torch.testing.assert_close(v.rollout, full[1:, 1:].mean(0).view(2, 3), atol=1e-6, rtol=0)
    assert not torch.allclose(v.rollout, full[0, 1:].view(2, 3), atol=1e-3)  # not REG1's row
    torch.testing.assert_close(v.heads, stack[1, :, 1:, 1:].mean(1).view(2, 2, 3))
    rel, target = class_relevance(model, pixels)
    expected = eager_relevance(model, pixels, target, head_rows=list(range(1, 7)))
    torch.testing.assert_close(rel.flatten(-2), expected, atol=1e-5, rtol=1e-4)


def test_analyses_create_nothing_off_the_input_device():
    """Capture, rollout, relevance, query maps and the tab's views on the `meta` device, up
    to the numpy boundary: a CPU tensor created inside and mixed in would raise, one
    returned would show here."""
    model = tiny("registers", num_classes=3).to("meta")
    pixels = torch.randn(2, 3, 42, 56, device="meta")
    maps = capture(model, pixels)
    handed = []
    capture(model, pixels, [EachLayer(lambda _l, p: handed.append(p.sum()))])
    fallback = capture(with_other_attention(model), pixels)
    results = [
        maps.features, maps.token_norms, maps.logits, *maps.q, *maps.k, *maps.head_mean,
        *handed, fallback.stack(), torch.stack(fallback.head_mean),
        maps.stack(), maps.rows(1, [0, 7]),
        attention_rollout(maps), attention_rollout(maps, rows=[0]),
        attention_rollout(maps, "max", 0.5, 1), attention_rollout(maps, "min", 0.2, rows=[3]),
        cls_rollout_map(maps), patch_rollout_map(maps),
        query_maps(maps, 1, maps.token_index(1, 2)), query_maps_all_layers(maps, 0),
        class_token_maps(maps, 0), prefix_attention_share(maps),
        mass_mask(class_token_maps(maps, 1), 0.6), high_norm_tokens(maps.token_norms[-1], 5),
        *class_relevance(model, pixels), *class_relevance(model, pixels, target=1),
        *query_views(maps, 2, 3, layer=1, head=0), *query_views(maps, 0, 0, layer=0),
    ]
    v = attention_views(maps, layer=1, head_fusion="max", rollout_fusion="min",
                        discard_ratio=0.3)
    results += [x for x in dataclasses.astuple(v) if isinstance(x, torch.Tensor)]
    off = [i for i, t in enumerate(results) if t.device.type != "meta"]
    assert not off, f"results {off} left the input's device"
