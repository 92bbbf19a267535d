"""Our ImageGPT against transformers' on tiny random weights, the KV cache, and the NLL."""

import math

import pytest
import torch

from explorer.igpt.likelihood import bits_per_dim, pixel_nll_bits
from explorer.igpt.model import IGPTConfig, ImageGPT
from tests.igpt_helpers import known_distribution_model, tiny_hf


def test_state_dict_names_and_shapes_match_transformers():
    hf = tiny_hf()
    ours = ImageGPT(IGPTConfig.from_hf(hf.config))
    theirs = {k: v.shape for k, v in hf.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == theirs
    assert theirs["lm_head.weight"] == (16, 32)  # 17 inputs, 16 outputs: no start logit
    assert ours.config.start_token == 16


def test_logits_equal_transformers_eager():
    hf = tiny_hf()
    ours = ImageGPT.from_hf(hf)
    idx = torch.cat([torch.full((3, 1), 16), torch.randint(0, 16, (3, 35))], 1)
    with torch.no_grad():
        ref = hf(idx).logits
        got = ours(idx)
    assert got.shape == (3, 36, 16)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_round_trip_to_transformers():
    ours = ImageGPT(IGPTConfig(vocab_size=9, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    idx = torch.randint(0, 9, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours.to_hf()(idx).logits, ours.eval()(idx))


def test_imagegpt_layernorm_is_rms_without_bias():
    ln = ImageGPT(IGPTConfig(n_layer=1, n_embd=4, n_head=1, vocab_size=3,
                             n_positions=4)).transformer.ln_f
    x = torch.tensor([[1.0, 1.0, 1.0, 5.0]])  # RMS = sqrt(28 / 4)
    torch.testing.assert_close(ln(x), x / math.sqrt(7 + 1e-5))


def test_cached_steps_equal_full_forward():
    ours = ImageGPT.from_hf(tiny_hf())
    idx = torch.cat([torch.full((2, 1), 16), torch.randint(0, 16, (2, 35))], 1)
    with torch.no_grad():
        full = ours(idx)
        caches = ours.new_cache(2, 36)
        pre = ours(idx[:, :10], caches, pos=0)  # prefill 10 positions
        steps = [ours(idx[:, t:t + 1], caches, pos=t) for t in range(10, 36)]
    torch.testing.assert_close(torch.cat([pre, *steps], 1), full, atol=1e-5, rtol=1e-5)


def test_too_long_sequence_raises():
    ours = ImageGPT.from_hf(tiny_hf())
    with pytest.raises(ValueError, match="n_positions"):
        ours(torch.zeros(1, 37, dtype=torch.long))


def test_nll_bits_of_known_distribution():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    m = known_distribution_model(probs)
    img = torch.tensor([[[0, 1], [2, 3]], [[0, 0], [0, 0]]])  # (2, 2, 2)
    bits = pixel_nll_bits(m, img)
    # -log2 p: colour 0 -> 1 bit, 1 -> 2 bits, 2 and 3 -> 3 bits
    torch.testing.assert_close(bits, torch.tensor([[[1.0, 2.0], [3.0, 3.0]],
                                                   [[1.0, 1.0], [1.0, 1.0]]]), atol=1e-4, rtol=0)
    assert bits_per_dim(bits[:1]) == pytest.approx(9 / 4, abs=1e-4)
    assert bits_per_dim(bits[:1], channels=3) == pytest.approx(9 / 12, abs=1e-4)


def test_nll_of_uniform_model_is_log2_k():
    m = known_distribution_model(torch.full((16,), 1 / 16))
    bits = pixel_nll_bits(m, torch.randint(0, 16, (3, 4, 4)))
    torch.testing.assert_close(bits, torch.full((3, 4, 4), 4.0), atol=1e-4, rtol=0)
