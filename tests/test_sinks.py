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
