"""Tokenisation math against hand-derived expectations, tiny models and the real default."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from explorer import images, models, patches


def tiny(name="vit_tiny_patch16_224", **kwargs):
    kwargs = {"depth": 1, "embed_dim": 32, "num_heads": 2, "dynamic_img_size": True, **kwargs}
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def test_grid_and_costs_by_hand():
    assert patches.grid_for((224, 336), (14, 14)) == (16, 24)
    costs = patches.compare_costs((224, 224), (16, 16), num_prefix_tokens=1, width=768)
    vit, pix = costs["patches (ViT)"], costs["pixels (iGPT-style)"]
    assert (vit.tokens, pix.tokens) == (197, 50_176)
    assert vit.attention_entries == 197**2 and pix.attention_entries == 50_176**2
    assert vit.attention_flops == 4 * 197**2 * 768
    assert vit.attention_bytes == 4 * 197**2  # one fp32 matrix per head


def test_cost_figure_leaves_room_for_every_bar_and_its_number():
    """Log axis from half a decade under the shortest bar (197 tokens) to a decade over the
    tallest (50,176² entries), so the number above that bar is inside the figure; numbers
    are drawn whole (plotly shrinks an outside label to the bar's width by default)."""
    import math

    from explorer.plots.tokens import cost_figure

    costs = patches.compare_costs((224, 224), (16, 16), num_prefix_tokens=1, width=768)
    fig = cost_figure(costs, (224, 224))
    low, high = fig.layout.yaxis.range
    assert low == pytest.approx(math.log10(197) - 0.5)
    assert high == pytest.approx(math.log10(50_176**2) + 1.0)
    assert [list(bar.text) for bar in fig.data] == [["197", "50,176"],
                                                     ["38,809", "2,517,630,976"]]
    assert {(bar.constraintext, bar.cliponaxis) for bar in fig.data} == {("none", False)}


def test_igpt_cost_is_the_same_cost_of_its_pixel_sequence():
    from explorer.igpt.sequence import attention_cost as igpt_cost

    # 28x28 pixels read after iGPT's start token: 785 tokens, priced by the one function.
    one = patches.attention_cost(28 * 28 + 1, 512)
    igpt = igpt_cost(28, 28, 512)
    assert (igpt["seq_len"], igpt["attn_entries"], igpt["attn_flops"]) == (
        one.tokens, one.attention_entries, one.attention_flops)
    assert igpt["attn_mb"] * 1e6 == one.attention_bytes


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [({}, ["CLS"]), ({"reg_tokens": 4, "no_embed_class": True}, ["CLS", "REG1", "REG2", "REG3", "REG4"]),
     ({"class_token": False, "global_pool": "avg"}, [])],
)
def test_prefix_token_names(kwargs, names):
    assert patches.prefix_token_names(tiny(**kwargs)) == names


def test_prefix_names_distilled():
    model = tiny("deit_tiny_distilled_patch16_224")
    assert patches.prefix_token_names(model) == ["CLS", "DIST"]


def test_filter_components_find_the_one_direction():
    """Filters that are all multiples of one pattern (plus a mean) have that pattern as PC1."""
    model = tiny()
    torch.manual_seed(0)
    pattern = torch.randn(3, 16, 16)
    scales = torch.randn(32, 1, 1, 1)
    with torch.no_grad():
        model.patch_embed.proj.weight.copy_(scales * pattern + 0.3)
    comps = patches.patch_embedding_components(model, k=4)
    assert comps.shape == (4, 3, 16, 16) and comps.min() >= 0 and comps.max() <= 1
    pc1 = comps[0].flatten() - comps[0].mean()
    target = pattern.flatten() - pattern.mean()
    assert torch.nn.functional.cosine_similarity(pc1, target, dim=0).abs() > 0.999


def test_position_similarity_by_hand():
    pos = torch.eye(6).reshape(2, 3, 6)  # orthonormal embeddings: identity similarity
    sim = patches.position_similarity(pos)
    assert sim.shape == (2, 3, 2, 3)
    assert torch.allclose(sim.reshape(6, 6), torch.eye(6))


@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 2, "no_embed_class": True}])
def test_interpolated_position_embedding_is_what_the_model_adds(kwargs):
    model = tiny(img_size=64, **kwargs)  # native grid 4x4
    assert patches.patch_position_embedding(model).shape == (4, 4, 32)
    grid = (3, 5)
    pos = patches.patch_position_embedding(model, grid)
    x = torch.zeros(1, *grid, 32)  # NHWC patch tokens of value 0: _pos_embed adds exactly pos
    with torch.no_grad():
        added = model._pos_embed(x)[:, model.num_prefix_tokens:]
    assert torch.allclose(added.reshape(*grid, 32), pos, atol=1e-6)


def test_feature_pca_separates_two_regions():
    grid = (4, 6)
    features = torch.zeros(24, 8)
    features[:, 0] = torch.tensor([1.0 if c < 3 else -1.0 for r in range(4) for c in range(6)])
    features += 0.01 * torch.randn(24, 8)
    rgb = patches.feature_pca_rgb(features, grid)
    assert rgb.shape == (4, 6, 3) and rgb.min() >= 0 and rgb.max() <= 1
    left, right = rgb[:, :3, 0], rgb[:, 3:, 0]
    assert (left.mean() - right.mean()).abs() > 0.9  # PC1 = left vs right


def test_analyse_tokenization_on_default_model_non_square():
    model, config = models.load_vit(None)
    image = images.open_image("assets/examples/coffee.jpg")
    result = patches.analyse_tokenization(model, images.prepare_pixels(image, config, (224, 336)))
    assert result.grid == (16, 24) and result.patch == (14, 14)
    assert result.native_grid == (37, 37) and result.prefix_names == ["CLS"]
    assert result.pos_similarity_native.shape == (37, 37, 37, 37)
    assert result.pos_similarity.shape == (16, 24, 16, 24)
    diag = result.pos_similarity.reshape(384, 384).diagonal()
    assert torch.allclose(diag, torch.ones(384), atol=1e-5)
    # position embeddings are local: a patch is more similar to its neighbour than to a far one
    sim = result.pos_similarity[8, 12]
    assert sim[8, 13] > sim[0, 0] and sim[9, 12] > sim[15, 23]
    assert result.costs["pixels (iGPT-style)"].tokens == 224 * 336
    assert result.feature_rgb.shape == (16, 24, 3) and torch.isfinite(result.feature_rgb).all()


@pytest.mark.parametrize("shape", [(50, 8), (8, 50)])
def test_principal_directions_match_svd(shape):
    torch.manual_seed(1)
    x = torch.randn(*shape) * torch.linspace(3, 0.1, shape[1])  # distinct variances
    dirs = patches.principal_directions(x, 3)
    _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    cos = (dirs * vh[:3]).sum(-1).abs()
    assert dirs.shape == (3, shape[1]) and torch.allclose(cos, torch.ones(3), atol=1e-4)


def test_similarity_mosaic_layout():
    """Tile (i, j) is patch (i, j)'s map: its cell (r, c) a zoom x zoom block coloured by
    sim[i, j, r, c] on [-1, 1], each tile followed by a 1 px white line."""
    from matplotlib import colormaps

    from explorer.plots.tokens import similarity_tiles

    def colour(value: float) -> np.ndarray:  # viridis on [-1, 1], as uint8
        return (np.array(colormaps["viridis"]((value + 1) / 2)[:3]) * 255 + 0.5).astype(np.uint8)

    sim = torch.rand(4, 6, 4, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mosaic = similarity_tiles(sim, width=6 * 7 * 3)  # zoom 3: tiles of (4*3+1) x (6*3+1) px
    assert mosaic.shape == (4 * 13, 6 * 19, 3)
    for i, j, r, c in [(0, 0, 0, 0), (1, 4, 3, 5), (3, 5, 2, 1), (2, 0, 0, 5)]:
        y, x = i * 13 + r * 3, j * 19 + c * 3
        block = mosaic[y:y + 3, x:x + 3]
        assert (block == colour(float(sim[i, j, r, c]))).all(), (i, j, r, c)
    assert (mosaic[12::13] == 255).all() and (mosaic[:, 18::19] == 255).all()  # the white lines
    # DINOv2's 37x37 grid: every 2nd patch's (complete) map, 19 tiles a side
    big_sim = torch.rand(37, 37, 37, 37, generator=torch.Generator().manual_seed(1)) * 2 - 1
    big = similarity_tiles(big_sim, max_tiles=20)
    assert big.shape[0] == 19 * 38 and big.shape[1] == 19 * 38  # zoom 1: 37 px + 1 px line
    assert (big[38 + 36, 3 * 38 + 0] == colour(float(big_sim[2, 6, 36, 0]))).all()


def test_embedding_views_are_computed_once_per_model_and_follow_weight_changes():
    model = tiny().eval()
    filters, similarity = patches.embedding_views(model)
    assert torch.equal(filters, patches.patch_embedding_components(model))
    assert torch.equal(similarity,
                       patches.position_similarity(patches.patch_position_embedding(model)))
    assert patches.embedding_views(model)[0] is filters  # kept
    with torch.no_grad():
        model.patch_embed.proj.weight.mul_(-1.0).add_(1.0)  # in place, as an optimiser step
    changed = patches.embedding_views(model)[0]
    assert changed is not filters
    assert torch.equal(changed, patches.patch_embedding_components(model))
    other = tiny().eval()  # same architecture, other weights: its own entry
    assert torch.equal(patches.embedding_views(other)[0], patches.patch_embedding_components(other))
