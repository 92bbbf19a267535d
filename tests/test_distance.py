"""Mean attention distance: hand-derived values, prefix handling, datasets, CNN fields."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from torch import nn

from explorer import distance
from explorer.cache import KeyedCache
from explorer.distance import (
    dataset_mean_attention_distance,
    fashion_mnist_images,
    mean_attention_distance,
    mobilenet_receptive_fields,
    model_mean_attention_distance,
    patch_distance_matrix,
    random_init_like,
    theoretical_receptive_fields,
)
from explorer.images import prepare_pixels
from explorer.models import load_vit


def uniform(n_patches: int, prefix: int = 0, layers: int = 1, heads: int = 1) -> torch.Tensor:
    N = n_patches + prefix
    return torch.full((layers, heads, N, N), 1.0 / N)


def test_uniform_attention_14x14_grid_of_16px_is_116_5():
    for prefix in (0, 1, 5):  # "drop" renormalises over patch keys whatever the prefix
        d = mean_attention_distance(uniform(196, prefix), (14, 14), 16, prefix)
        assert d.shape == (1, 1)
        assert d.item() == pytest.approx(116.5, abs=0.1)


def test_self_attention_only_is_zero():
    n, p = 12, 2
    a = torch.zeros(3, 4, n + p, n + p)
    a[..., range(n + p), range(n + p)] = 1.0
    d = mean_attention_distance(a, (3, 4), 14, p)
    assert d.shape == (3, 4)
    torch.testing.assert_close(d, torch.zeros(3, 4))


def test_non_square_grid_by_hand():
    # 2x3 grid, 10-px patches, uniform: mean over the 36 ordered pairs of centre distances
    # = (16 + 6 + 8√2 + 4√5) / 36 patches = 11.738 px.
    expected = 10 * (16 + 6 + 8 * math.sqrt(2) + 4 * math.sqrt(5)) / 36
    d = mean_attention_distance(uniform(6), (2, 3), 10, 0)
    assert d.item() == pytest.approx(expected, abs=1e-4)
    # the transposed grid gives the same value; a (height, width) patch size is honoured
    assert mean_attention_distance(uniform(6), (3, 2), (10, 10), 0).item() == pytest.approx(expected)
    dist = patch_distance_matrix((1, 2), (5, 20))  # two patches side by side, 20 px wide
    assert dist[0, 1].item() == pytest.approx(20.0)


def test_prefix_drop_versus_keep():
    n, p = 9, 1
    a = torch.zeros(1, 1, n + p, n + p)
    a[..., :, 0] = 0.5  # half of every row to the class token
    a[..., :, p:] += 0.5 / n  # the other half uniform over patches
    full_uniform = mean_attention_distance(uniform(n), (3, 3), 16, 0).item()
    drop = mean_attention_distance(a, (3, 3), 16, p).item()
    keep = mean_attention_distance(a, (3, 3), 16, p, prefix="keep").item()
    assert drop == pytest.approx(full_uniform, rel=1e-5)
    assert keep == pytest.approx(0.5 * full_uniform, rel=1e-5)
    with pytest.raises(ValueError, match="prefix"):
        mean_attention_distance(a, (3, 3), 16, p, prefix="ignore")


def test_batch_and_per_image():
    a = torch.rand(2, 3, 2, 10, 10).softmax(-1)  # (L, B, H, N, N)
    per = mean_attention_distance(a, (3, 3), 16, 1, per_image=True)
    assert per.shape == (3, 2, 2)
    torch.testing.assert_close(mean_attention_distance(a, (3, 3), 16, 1), per.mean(0))
    single = mean_attention_distance(a[:, 1], (3, 3), 16, 1)
    torch.testing.assert_close(per[1], single)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56,
                             embed_dim=64, depth=2, num_heads=2, dynamic_img_size=True).eval()


def test_model_distance_matches_stacked_maps(tiny_model):
    from explorer.attention import capture

    pixels = torch.randn(1, 3, 42, 70)
    maps = capture(tiny_model, pixels)
    expected = mean_attention_distance(maps.stack(), maps.grid, 14, 5)
    d = model_mean_attention_distance(tiny_model, pixels)
    torch.testing.assert_close(d, expected)
    assert d.shape == (2, 2) and (d > 0).all() and (d < math.hypot(42, 70)).all()


def test_dataset_version_on_fashion_mnist(tiny_model):
    imgs = fashion_mnist_images(5)
    assert len(imgs) == 5 and imgs[0].size == (28, 28) and imgs[0].mode == "RGB"
    calls = []
    cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "input_size": (3, 56, 56)}
    stats = dataset_mean_attention_distance(tiny_model, cfg, imgs, (56, 56), batch_size=2,
                                            progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 5), (4, 5), (5, 5)]
    assert stats.mean.shape == stats.std.shape == (2, 2) and stats.n_images == 5
    # The batched statistic is the mean and spread of the images taken one at a time.
    one_by_one = torch.stack([model_mean_attention_distance(
        tiny_model, prepare_pixels(im, cfg, (56, 56))) for im in imgs])
    torch.testing.assert_close(stats.mean, one_by_one.mean(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stats.std, one_by_one.std(0), atol=1e-4, rtol=1e-4)
    assert (stats.std > 0).all() and stats.images_per_second > 0


def test_dataset_cache_keys_by_weights_and_builds_once(tiny_model, monkeypatch):
    calls = []

    def fake(model, config, images, size, prefix="drop", progress=None):
        calls.append(model)
        return distance.DistanceStats(torch.zeros(2, 2), torch.zeros(2, 2), len(images), 1.0,
                                      size)

    monkeypatch.setattr(distance, "dataset_mean_attention_distance", fake)
    monkeypatch.setattr(distance, "DATASET_STATS", KeyedCache(max_items=16))
    cfg = {"mean": (0.5,) * 3, "std": (0.5,) * 3, "input_size": (3, 56, 56)}
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        other.blocks[1].attn.qkv.weight.mul_(2)  # same architecture and name, other weights
    args = ("bundled examples", 2, None, (56, 56))
    first = distance.cached_dataset_distance(tiny_model, cfg, *args)
    assert distance.cached_dataset_distance(tiny_model, cfg, *args) is first
    assert distance.cached_dataset_distance(other, cfg, *args) is not first
    assert calls == [tiny_model, other] and len(distance.DATASET_STATS) == 2
    head_only = copy.deepcopy(tiny_model)
    head_only.reset_classifier(3)  # a new classifier does not change attention
    assert distance.cached_dataset_distance(head_only, cfg, *args) is first


def test_random_init_cache_per_weights_and_bounded(tiny_model, monkeypatch):
    monkeypatch.setattr(distance, "RANDOM_INITS", KeyedCache(max_items=2))
    a = distance.random_init_cached("m", tiny_model)
    assert distance.random_init_cached("m", tiny_model) is a
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        other.pos_embed.add_(1)
    assert distance.random_init_cached("m", other) is not a
    distance.random_init_cached("n", tiny_model)
    assert len(distance.RANDOM_INITS) == 2  # the oldest went


def test_random_init_like_same_architecture_new_weights(tiny_model):
    trained = copy.deepcopy(tiny_model)
    with torch.no_grad():
        trained.blocks[0].norm1.weight.fill_(3.0)  # as if trained
    fresh = random_init_like(trained)
    assert type(fresh) is type(trained) and fresh.num_prefix_tokens == 5
    assert fresh.blocks[0].attn.qkv.weight.shape == trained.blocks[0].attn.qkv.weight.shape
    assert not torch.equal(fresh.blocks[0].attn.qkv.weight, trained.blocks[0].attn.qkv.weight)
    assert torch.equal(fresh.blocks[0].norm1.weight, torch.ones(64))  # reset too
    assert fresh.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.2)
    torch.testing.assert_close(random_init_like(trained).blocks[1].mlp.fc1.weight,
                               fresh.blocks[1].mlp.fc1.weight)  # seeded: reproducible


def test_theoretical_receptive_field_by_hand():
    stages = [
        ("a", nn.Conv2d(3, 4, 3, stride=1, padding=1)),  # r = 3, j = 1
        ("b", nn.Conv2d(4, 4, 3, stride=2, padding=1)),  # r = 5, j = 2
        ("c", nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1))),  # r = 9
    ]
    fields = theoretical_receptive_fields(stages)
    assert [(f.size, f.jump) for f in fields] == [(3, 1), (5, 2), (9, 2)]
    assert [f.start for f in fields] == [0.0, 0.0, 0.0]


def test_mobilenet_v2_receptive_fields_offline():
    from PIL import Image

    image = Image.open("assets/examples/chelsea.jpg").convert("RGB")
    rf = mobilenet_receptive_fields(image, size=96)
    assert len(rf.stages) == 19
    assert rf.theoretical_uncapped[0] == 3 and rf.theoretical_uncapped[-1] == 491
    assert rf.theoretical_uncapped == sorted(rf.theoretical_uncapped)
    assert max(rf.theoretical) == 96  # capped at the image side
    assert rf.erf_maps.shape == (19, 96, 96)
    assert all(0 <= d < 96 for d in rf.effective_distance)
    # the effective field is far smaller than the theoretical one, and grows with depth
    assert rf.effective_distance[-1] > 3 * rf.effective_distance[1]
    assert all(e < t for e, t in zip(rf.effective_distance, rf.theoretical, strict=True))


def test_folded_batchnorm_computes_the_same_function_and_fields():
    from torchvision.models import mobilenet_v2

    from explorer.distance import effective_receptive_fields, fold_batchnorm, mobilenet_stages

    torch.manual_seed(0)
    plain = mobilenet_v2(weights=None)
    for m in plain.modules():  # non-trivial running statistics and affine parameters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.5, 0.5)
    plain.eval()
    folded = fold_batchnorm(copy.deepcopy(plain))
    kinds = {type(m) for m in folded.modules()}
    assert torch.nn.BatchNorm2d not in kinds and torch.nn.Identity in kinds
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), plain(x), rtol=1e-4, atol=1e-4)
    a = effective_receptive_fields(plain, mobilenet_stages(plain), x)
    b = effective_receptive_fields(folded, mobilenet_stages(folded), x)
    assert a.theoretical_uncapped == b.theoretical_uncapped  # the conv geometry is untouched
    for d_a, d_b in zip(a.effective_distance, b.effective_distance, strict=True):
        assert math.isclose(d_a, d_b, rel_tol=1e-3)
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(mobilenet_v2(weights=None).train())


def test_default_model_14px_patches():
    model, cfg = load_vit(None)
    pixels = torch.randn(1, 3, 14 * 8, 14 * 12)  # 8x12 grid of 14-px patches
    d = model_mean_attention_distance(model, pixels)
    assert d.shape == (12, 6)
    assert (d > 0).all() and (d < math.hypot(112, 168)).all()
    # The same statistic from the kept maps: the 14 px patches and 8x12 grid are read right.
    from explorer.attention import capture

    maps = capture(model, pixels)
    assert maps.grid == (8, 12)
    expected = mean_attention_distance(maps.stack(), (8, 12), 14, model.num_prefix_tokens)
    torch.testing.assert_close(d, expected, atol=1e-3, rtol=1e-4)


def test_random_init_curve_is_the_reference_images_and_kept(tiny_model):
    from timm.data import resolve_model_data_config

    from explorer.images import prepare_pixels

    config = resolve_model_data_config(tiny_model)
    curve = distance.random_init_distance("tiny", tiny_model, config, (56, 56))
    fresh = distance.random_init_cached("tiny", tiny_model)
    pixels = prepare_pixels(distance.example_images()[0], config, (56, 56), "crop")
    torch.testing.assert_close(curve, distance.model_mean_attention_distance(fresh, pixels))
    assert distance.random_init_distance("tiny", tiny_model, config, (56, 56)) is curve
    assert distance.random_init_distance("tiny", tiny_model, config, (56, 56), prefix="keep") \
        is not curve


def test_cnn_fields_kept_per_image_content():
    from PIL import Image

    image = Image.new("RGB", (64, 48), (10, 200, 30))
    first = mobilenet_receptive_fields(image, size=64)
    assert mobilenet_receptive_fields(image.copy(), size=64) is first  # same pixels
    other = Image.new("RGB", (64, 48), (200, 10, 30))
    assert mobilenet_receptive_fields(other, size=64) is not first
