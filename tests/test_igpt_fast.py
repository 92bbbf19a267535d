"""The fast decoder (int8 weights, bfloat16 cache): what it changes and what it must not."""

import gradio as gr
import pytest
import torch
from PIL import Image

from explorer.igpt.checkpoint import OFFLINE_NAME, load_igpt
from explorer.igpt.data import load_fashion_mnist
from explorer.igpt.fast import KV_DTYPE, Int8Conv1D, fast_decoder
from explorer.igpt.likelihood import bits_per_dim, pixel_nll_bits, pixel_nll_bits_decoding
from explorer.igpt.model import Conv1D
from explorer.igpt.pipeline import image_tokens, stream_completions
from explorer.igpt.sampler import SampleConfig
from explorer.ui import igpt_tab


@pytest.fixture(scope="module")
def offline():
    return load_igpt(OFFLINE_NAME)


@pytest.fixture(scope="module")
def test_tokens(offline):
    images, _ = load_fashion_mnist("test")
    return torch.stack([image_tokens(Image.fromarray(images[i].numpy(), "L"), offline)[1]
                        for i in range(0, 1600, 100)])  # 16 held-out images, (16, 28, 28)


def test_fast_decoder_is_a_quantised_copy(offline):
    fast = fast_decoder(offline.model)
    block = fast.transformer.h[0]
    assert isinstance(block.attn.c_attn, Int8Conv1D) and isinstance(block.mlp.c_proj, Int8Conv1D)
    assert all(c.dtype == KV_DTYPE for c in fast.new_cache(2, 10)[0])
    # the original is untouched: fp32 Conv1D weights and an fp32 cache
    assert isinstance(offline.model.transformer.h[0].attn.c_attn, Conv1D)
    assert offline.model.new_cache(2, 10)[0][0].dtype == torch.float32


def test_decode_path_scores_equal_the_full_forward_in_fp32(offline, test_tokens):
    """The cached one-token path is the same model as teacher forcing (so it can judge the
    fast decoder)."""
    full = pixel_nll_bits(offline.model, test_tokens[:4])
    stepwise = pixel_nll_bits_decoding(offline.model, test_tokens[:4])
    torch.testing.assert_close(stepwise, full, atol=1e-3, rtol=1e-4)


def test_fast_decoder_predicts_nearly_as_well(offline, test_tokens):
    exact = bits_per_dim(pixel_nll_bits_decoding(offline.model, test_tokens))
    fast = bits_per_dim(pixel_nll_bits_decoding(fast_decoder(offline.model), test_tokens))
    assert 0.3 < exact < 1.5  # a trained model on held-out images
    assert abs(fast - exact) < 0.01 * exact, (fast, exact)


def test_fast_model_is_cached_and_completes(offline, test_tokens):
    fast = load_igpt(OFFLINE_NAME, fast=True)
    assert load_igpt(OFFLINE_NAME, fast=True) is fast
    assert fast.model is not offline.model and fast.palette is offline.palette
    tokens = test_tokens[0]
    *_, (filled, samples) = stream_completions(fast, tokens, 14, 3, SampleConfig(seed=1))
    assert filled == 28 * 28 and samples.shape == (3, 28, 28)
    assert torch.equal(samples[:, :14], tokens[:14].expand(3, 14, 28))
    assert 0 <= int(samples.min()) and int(samples.max()) < 8


def test_tab_rejects_an_unknown_decoder():
    with pytest.raises(gr.Error, match="Decoder must be one of"):
        next(igpt_tab.complete("x.png", OFFLINE_NAME, 14, 2, 1.0, 0, 1.0, 0, decoder="turbo"))


def test_fast_decoder_keeps_no_second_copy_of_the_weights(offline):
    fast = fast_decoder(offline.model)
    original = {p.data_ptr() for p in offline.model.parameters()}
    kept = [n for n, p in fast.named_parameters()]  # fp32 tensors left in the copy
    assert all(n.startswith(("transformer.wte", "transformer.wpe", "transformer.ln_f"))
               or ".ln_" in n for n in kept), kept
    assert not any(p.data_ptr() in original for p in fast.parameters())  # small ones: copies
    assert isinstance(offline.model.transformer.h[0].mlp.c_fc, Conv1D)  # original untouched
