"""attention_rollout: hand-derived cases, row sums for every setting, the rows fast path."""

from __future__ import annotations

import itertools

import pytest
import timm
import torch

from explorer.attention import attention_rollout, capture, cls_rollout_map


def random_attention(L=3, H=4, N=7, B=None, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (L, H, N, N) if B is None else (L, B, H, N, N)
    return (3 * torch.randn(*shape, generator=g)).softmax(-1)


def test_identity_attention_rolls_out_to_identity():
    eye = torch.eye(6).expand(4, 3, 6, 6)  # 4 layers, 3 heads
    for fusion in ("mean", "max", "min"):
        torch.testing.assert_close(attention_rollout(eye, head_fusion=fusion), torch.eye(6))
        rows = attention_rollout(eye, fusion, rows=[0, 5])
        torch.testing.assert_close(rows, torch.eye(6)[[0, 5]])


def test_one_uniform_layer_by_hand():
    N = 4
    uniform = torch.full((1, 2, N, N), 1 / N)
    expected = 0.5 * (torch.full((N, N), 1 / N) + torch.eye(N))  # rows already sum to 1
    torch.testing.assert_close(attention_rollout(uniform), expected)


def test_two_layers_multiply_top_first():
    a = random_attention(L=2, H=1, N=5)
    step = [0.5 * (a[i, 0] + torch.eye(5)) for i in range(2)]
    torch.testing.assert_close(attention_rollout(a), step[1] @ step[0])
    torch.testing.assert_close(attention_rollout(a, start_layer=1), step[1])


@pytest.mark.parametrize(
    "fusion,discard,start",
    list(itertools.product(("mean", "max", "min"), (0.0, 0.3, 0.9), (0, 2))),
)
def test_rows_sum_to_one_for_every_setting(fusion, discard, start):
    a = random_attention(L=4, B=2)
    out = attention_rollout(a, head_fusion=fusion, discard_ratio=discard, start_layer=start)
    assert out.shape == (2, 7, 7)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 7))
    assert (out >= 0).all()
    rows = attention_rollout(a, fusion, discard, start, rows=[0, 3])
    torch.testing.assert_close(rows, out[:, [0, 3]])


def test_max_fusion_needs_keepdim_renormalisation():
    """With max fusion, rows of 0.5 (A + I) do not sum to 1: renormalising by row is needed."""
    a = random_attention(L=1, H=4, N=5)
    raw = 0.5 * (a[0].amax(0) + torch.eye(5))
    assert not torch.allclose(raw.sum(-1), torch.ones(5))
    wrong = raw / raw.sum(-1)  # the keepdim bug: divides column j by row j's sum
    assert not torch.allclose(wrong.sum(-1), torch.ones(5))
    torch.testing.assert_close(attention_rollout(a, "max").sum(-1), torch.ones(5))


def test_rejects_bad_settings():
    a = random_attention()
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout(a, head_fusion="median")
    with pytest.raises(ValueError, match="discard_ratio"):
        attention_rollout(a, discard_ratio=1.0)
    with pytest.raises(ValueError, match="start_layer"):
        attention_rollout(a, start_layer=3)


def test_rollout_from_maps_matches_rollout_of_stack():
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56,
                              embed_dim=64, depth=3, num_heads=2, dynamic_img_size=True).eval()
    maps = capture(model, torch.randn(2, 3, 42, 70))  # 3x5 grid, 5 prefix tokens
    full = attention_rollout(maps.stack())
    torch.testing.assert_close(attention_rollout(maps), full)
    torch.testing.assert_close(attention_rollout(maps, rows=[0]), full[:, [0]])
    cls_map = cls_rollout_map(maps)
    assert cls_map.shape == (2, 3, 5)
    torch.testing.assert_close(cls_map.flatten(-2), full[:, 0, 5:])


def test_masked_rollout_takes_a_sink_out_of_every_layer_by_hand():
    from explorer.attention.rollout import mask_keys

    # one layer, one head, 3 tokens; every query gives 0.6 to token 2 (the sink)
    attn = torch.tensor([[0.2, 0.2, 0.6]] * 3).reshape(1, 1, 3, 3)
    assert torch.allclose(mask_keys(attn[0, 0], [2]), torch.tensor([[0.5, 0.5, 0.0]] * 3))
    # 0.5 (A' + I) with A' the masked rows [0.5, 0.5, 0]
    expected = torch.tensor([[0.75, 0.25, 0.0], [0.25, 0.75, 0.0], [0.25, 0.25, 0.5]])
    assert torch.allclose(attention_rollout(attn, masked=[2]), expected)
    assert torch.allclose(attention_rollout(attn, masked=[2], rows=[0]), expected[:1])
    # unmasked, the sink keeps its 0.6 / 2 = 0.3 of every row
    assert torch.allclose(attention_rollout(attn)[0], torch.tensor([0.6, 0.1, 0.3]))
    assert torch.equal(mask_keys(attn, []), attn)
