"""Palettes and the raster sequence: values derived by hand."""

import torch
from transformers.models.imagegpt.image_processing_imagegpt import color_quantize_torch

from explorer.igpt.palette import (
    cluster_palette,
    grey_palette,
    grey_quantize,
    load_palette,
    rgb9_dequantize,
    rgb9_palette,
    rgb9_quantize,
    save_palette,
)
from explorer.igpt.sequence import attention_cost, model_inputs, raster, unraster, with_start


def test_rgb9_known_colours():
    px = torch.tensor([[0, 0, 0], [255, 255, 255], [255, 0, 0], [32, 64, 96], [31, 63, 95]],
                      dtype=torch.uint8)
    # top 3 bits: r3*64 + g3*8 + b3
    assert rgb9_quantize(px).tolist() == [0, 511, 7 * 64, 1 * 64 + 2 * 8 + 3, 0 * 64 + 1 * 8 + 2]
    # level i is shown as round(i * 255 / 7): 1 -> 36, 2 -> 73, 3 -> 109
    assert rgb9_dequantize(torch.tensor([83])).tolist() == [[36, 73, 109]]


def test_rgb9_round_trip_all_512():
    tokens = torch.arange(512)
    assert torch.equal(rgb9_quantize(rgb9_dequantize(tokens)), tokens)
    assert rgb9_palette().colors.shape == (512, 3)
    assert len({tuple(c) for c in rgb9_palette().colors.tolist()}) == 512


def test_rgb9_error_bounded_by_bin_width():
    img = torch.randint(0, 256, (50, 50, 3), dtype=torch.uint8)
    back = rgb9_dequantize(rgb9_quantize(img)).int()
    assert (back - img.int()).abs().max() < 32  # a bin is 32 grey values wide


def test_grey_palette_values_and_round_trip():
    p = grey_palette(8)
    assert p.size == 8 and p.is_grey
    assert p.colors[:, 0].tolist() == [0, 36, 73, 109, 146, 182, 219, 255]
    assert torch.equal(p.quantize(p.colors[None]), torch.arange(8)[None])  # a 1×8 image
    # the 8 greys are the r = g = b colours of the lecture's 9-bit palette (tokens i * 73)
    assert torch.equal(p.colors, rgb9_dequantize(torch.arange(8) * 73))


def test_grey_fast_path_matches_nearest_cluster():
    v = torch.arange(256, dtype=torch.uint8).view(16, 16)
    for levels in (2, 8, 16):
        assert torch.equal(grey_quantize(v, levels), grey_palette(levels).quantize(v))
    # nearest of 0, 36, 73, ...: 17 -> 0, 19 -> 36, 55 -> 73 (18 from 73, 19 from 36)
    assert grey_quantize(torch.tensor([17, 19, 55], dtype=torch.uint8), 8).tolist() == [0, 1, 2]


def test_cluster_quantize_matches_transformers():
    g = torch.Generator().manual_seed(0)
    centers = torch.rand(64, 3, generator=g) * 2 - 1
    img = torch.randint(0, 256, (10, 12, 3), dtype=torch.uint8, generator=g)
    ours = cluster_palette(centers).quantize(img)
    theirs = color_quantize_torch(img.float().view(-1, 3) / 127.5 - 1, centers).view(10, 12)
    assert torch.equal(ours, theirs)
    # dequantised centres map back to themselves when the centres are far apart
    assert torch.equal(cluster_palette(centers).dequantize(torch.tensor([3])),
                       torch.round(127.5 * (centers[3:4] + 1)).to(torch.uint8))


def test_palette_file_round_trip(tmp_path):
    p = grey_palette(8)
    save_palette(p, tmp_path / "p.json")
    q = load_palette(tmp_path / "p.json")
    assert q.name == p.name and torch.equal(q.colors, p.colors)


def test_raster_order_and_start_token():
    img = torch.arange(6).view(1, 2, 3)  # rows [0 1 2], [3 4 5]
    assert raster(img).tolist() == [[0, 1, 2, 3, 4, 5]]
    assert torch.equal(unraster(raster(img), 2, 3), img)
    assert with_start(raster(img), 512).tolist() == [[512, 0, 1, 2, 3, 4, 5]]
    inputs, targets = model_inputs(img, start_token=8)
    assert inputs.tolist() == [[8, 0, 1, 2, 3, 4]]  # start, then pixels 0..L-2
    assert targets.tolist() == [[0, 1, 2, 3, 4, 5]]  # position t predicts pixel t


def test_attention_cost_is_quadratic():
    c28, c64 = attention_cost(28, 28, 64), attention_cost(64, 64, 64)
    assert c28["seq_len"] == 785 and c64["seq_len"] == 4097  # pixels + the start token
    assert c28["attn_entries"] == 785 ** 2
    assert c28["attn_mb"] == 785 ** 2 * 4 / 1e6  # one fp32 matrix per head and layer
    assert c28["attn_flops"] == 4 * 785 ** 2 * 64  # QKᵀ and attention @ V, 2 FLOPs per MAC
    assert attention_cost(224, 224, 64)["pixels"] == 50176
