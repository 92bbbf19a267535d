"""Attention sinks (`explorer.attention.sinks`) and their words beside a map, on hand-built
attention matrices whose sinks are known."""

from __future__ import annotations

import pytest
import torch

from explorer.attention import SINK_FACTOR, Sink, attention_sinks, patch_sinks
from explorer.ui.attention_view import sink_note

N = 50  # uniform share 1/N = 0.02; a sink needs SINK_FACTOR / N = 0.2


def parked(token: int, weight: float, n: int = N) -> torch.Tensor:
    """(n, n): every query gives ``weight`` to ``token`` and spreads the rest uniformly."""
    attn = torch.full((n, n), (1 - weight) / n)
    attn[:, token] += weight
    return attn


def test_a_token_every_query_parks_attention_on_is_the_one_sink():
    # token 7 receives 0.3 + 0.7 / 50 = 0.314 from every query; every other token 0.014
    sinks = attention_sinks(parked(7, 0.3))
    assert [s.token for s in sinks] == [7]
    assert sinks[0].share == pytest.approx(0.314)
    assert sinks[0].least == pytest.approx(0.314)
    assert sinks[0].queries == 1.0


def test_uniform_and_identity_attention_have_no_sinks():
    assert attention_sinks(torch.full((N, N), 1 / N)) == []
    assert attention_sinks(torch.eye(N)) == []  # each token receives 1/N on average


def test_heads_are_averaged_and_half_the_queries_can_make_a_sink():
    # head 0 sends everything to token 3, head 1 is uniform: token 3 receives 0.5 + 0.01
    heads = torch.stack([parked(3, 1.0), torch.full((N, N), 1 / N)])
    (sink,) = attention_sinks(heads)
    assert sink.token == 3 and sink.share == pytest.approx(0.51)
    # only the first half of the queries park on token 9 (weight 0.8): it receives
    # 0.8 + 0.2 / N from those and 1 / N from the others; half the queries give it over 0.2
    half = torch.full((N, N), 1 / N)
    half[: N // 2] = parked(9, 0.8)[: N // 2]
    (sink,) = attention_sinks(half)
    assert sink.token == 9 and sink.queries == 0.5
    assert sink.least == pytest.approx(1 / N)
    assert sink.share == pytest.approx(0.5 * (0.8 + 0.2 / N) + 0.5 / N)


def test_the_threshold_is_sink_factor_times_uniform():
    # token 4 receives w + (1 - w) / N, which is SINK_FACTOR / N at w = (F - 1) / (N - 1)
    at = (SINK_FACTOR - 1) / (N - 1)
    assert attention_sinks(parked(4, at - 1e-3)) == []
    assert [s.token for s in attention_sinks(parked(4, at + 1e-3))] == [4]


def test_patch_sinks_leave_out_the_prefix_tokens_and_sort_by_share():
    attn = 0.5 * parked(0, 0.6) + 0.3 * parked(12, 1.0) + 0.2 * parked(30, 1.0)
    assert [s.token for s in attention_sinks(attn)] == [0, 12, 30]
    assert [s.token for s in patch_sinks(attn, num_prefix_tokens=1)] == [12, 30]


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="attention"):
        attention_sinks(torch.ones(3, 4))


def test_sink_note_names_the_strongest_patch_and_its_blocks():
    grid, prefix, n = (4, 5), 1, 21
    corner = prefix + 19  # row 4, column 5
    sinks = [[Sink(corner, 0.13, 0.04, 1.0)], [], [Sink(corner, 0.2, 0.1, 1.0)]]
    note = sink_note(sinks, grid, prefix, n)
    assert "in block 3 the tokens put on average 20%" in note
    assert "row 4, column 5" in note and "blocks 1, 3" in note and "4.8%" in note  # 1/21
    assert sink_note([[], []], grid, prefix, n) == ""


# --- the attention tab's sink view (`explorer.ui.attention_view`) ---------------------------

def _tiny_maps(class_token: bool = True):
    import timm

    from explorer.attention import capture

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=2, num_heads=2,
                              embed_dim=32, img_size=(48, 80), patch_size=16, reg_tokens=1,
                              class_token=class_token, global_pool="token" if class_token else "avg",
                              num_classes=0).eval()
    return capture(model, torch.randn(1, 3, 48, 80))  # 3x5 grid, 2 or 1 prefix tokens


@pytest.mark.parametrize("class_token", [True, False])
def test_masked_class_token_maps_zero_the_sinks_and_renormalise_each_row(class_token):
    from explorer.attention.rollout import mask_keys
    from explorer.ui.attention_view import masked_class_token_maps

    maps = _tiny_maps(class_token)
    p, tokens = maps.num_prefix_tokens, [p_ + maps.num_prefix_tokens for p_ in (3, 14)]
    probs = maps.probs(1)  # (1, heads, N, N), rows sum to 1
    got = masked_class_token_maps(maps, 1, tokens)  # (1, heads, 3, 5)
    rows = probs[:, :, :1] if class_token else probs[:, :, p:]  # the class token, or every patch
    by_hand = rows.clone()
    by_hand[..., tokens] = 0
    by_hand = (by_hand / by_hand.sum(-1, keepdim=True))[..., p:].mean(dim=2)
    torch.testing.assert_close(got.flatten(-2), by_hand, atol=1e-5, rtol=1e-5)
    flat = got.flatten(-2)
    assert (flat[..., [3, 14]] == 0).all()  # the sinks hold nothing
    assert (flat[..., 0] > rows.mean(2)[..., p]).all()  # the others gain, row by row
    torch.testing.assert_close(mask_keys(rows, [])[..., p:].mean(2).reshape(got.shape),
                               masked_class_token_maps(maps, 1, []))


def test_attention_views_mask_the_maps_and_the_rollout_they_show():
    from explorer.ui.attention_view import (
        attention_views,
        masked_class_token_maps,
        rollout_map,
    )

    maps = _tiny_maps()
    tokens = [maps.num_prefix_tokens + 7]
    v = attention_views(maps, 1, masked=tokens)
    torch.testing.assert_close(v.rollout, rollout_map(maps, tokens))
    torch.testing.assert_close(v.heads, masked_class_token_maps(maps, 1, tokens)[0])
    assert v.rollout.flatten()[7] < attention_views(maps, 1).rollout.flatten()[7]
    assert (v.per_layer.flatten(-2)[:, 7] == 0).all()  # every layer of the strip


def test_sink_view_note_says_where_each_view_peaks_from_the_maps():
    from explorer.ui.attention_view import sink_view_note

    grid, prefix, n = (4, 5), 1, 21
    corner = prefix + 19  # row 4, column 5
    sinks = [[Sink(corner, 0.13, 0.04, 1.0)], []]
    plain = torch.full((4, 5), 0.01)
    plain[3, 4] = 0.5  # the rollout peaks on the sink
    masked = torch.full((4, 5), 0.01)
    masked[1, 2] = 0.2  # without it, on the object
    masked[3, 4] = 0.0
    as_they_are = sink_view_note(sinks, grid, prefix, n, plain, masked, masked=False)
    assert "sinks as they are" in as_they_are
    # mean patch: (0.5 + 19 x 0.01) / 20 = 0.0345, so 0.5 is 14x it
    assert "peaks at row 4, column 5 (50.0% of the rollout, 14× the mean patch)" in as_they_are
    assert "itself a sink" in as_they_are and "then it peaks at row 2, column 3" in as_they_are
    shown = sink_view_note(sinks, grid, prefix, n, masked, plain, masked=True)
    assert "sinks masked" in shown and "the sink patch (at row 4, column 5)" in shown
    assert "peaks at row 2, column 3 (20.0% of the rollout" in shown
    assert "as they are, it peaks at row 4, column 5" in shown
    # the map's own peak decides: a rollout that peaks elsewhere is not called a sink
    elsewhere = sink_view_note(sinks, grid, prefix, n, masked, masked, masked=False)
    assert "not a sink itself" in elsewhere
    none = sink_view_note([[], []], grid, prefix, n, plain, plain, masked=True)
    assert none.startswith("No attention sink") and "masking changes nothing" in none
