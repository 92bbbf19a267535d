"""Every analysis the tabs call runs where the model lives, up to the numpy/PIL boundary.

No GPU is needed: the model and its input go to the ``meta`` device and each analysis runs
under `tests.device_guard.StaysOnDevice`, which fails on any op that mixes devices (a CPU
tensor made inside the analysis) or copies off the device before the views get the result.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torchvision.models import mobilenet_v2

from explorer import attention, distance, images, models, patches
from explorer.finetune.resolution import position_similarity_map
from explorer.ui import attention_view, common
from tests.device_guard import StaysOnDevice, assert_stays_on_device
from tests.odd_vit import odd_vit


def cls_reg_vit() -> torch.nn.Module:
    """A tiny ViT with a class token and two registers, 14 px patches (DINOv2-like)."""
    return timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, depth=2,
                             embed_dim=48, num_heads=3, reg_tokens=2, img_size=56,
                             dynamic_img_size=True).eval()


MODELS = {"odd": odd_vit, "cls+reg": cls_reg_vit}


@pytest.fixture(params=list(MODELS))
def on_meta(request):
    """(model, pixels) on the meta device, pixels a non-square whole number of patches."""
    model = MODELS[request.param]().to("meta")
    ph, pw = patches.patch_size(model)
    return model, torch.randn(1, 3, 3 * ph, 5 * pw, device="meta")


def test_the_guard_catches_what_meta_lets_through():
    meta = torch.ones(3, 3, device="meta")
    with StaysOnDevice() as guard:
        torch.eye(3) @ meta  # meta's matmul kernel does not check devices
    assert guard.problems and "cpu" in guard.problems[0]
    with StaysOnDevice() as guard:
        torch.arange(3)  # a tensor made on the CPU inside the analysis
        meta.cpu()  # leaving the device early
    assert len(guard.problems) == 2
    with StaysOnDevice() as guard:
        float((meta * 2).sum())  # a scalar read is fine
        torch.arange(3).to("meta")  # coming onto the device is fine... once it is there
    assert guard.problems == ["aten.arange.default: created on ['cpu']"]


def test_tokenisation_pca_and_position_embeddings(on_meta):
    model, pixels = on_meta
    result = assert_stays_on_device(patches.analyse_tokenization, model, pixels)
    for t in (result.filters, result.pos_similarity_native, result.pos_similarity,
              result.feature_rgb):
        assert t.device.type == "meta"
    assert result.feature_rgb.shape == (3, 5, 3)
    sim = assert_stays_on_device(position_similarity_map, model)
    assert sim.device.type == "meta"


def test_mean_attention_distance(on_meta):
    model, pixels = on_meta
    d = assert_stays_on_device(distance.model_mean_attention_distance, model, pixels)
    assert d.shape == (len(model.blocks), model.blocks[0].attn.num_heads)
    assert d.device.type == "meta"


def test_cnn_effective_receptive_fields():
    with torch.device("meta"):
        cnn = mobilenet_v2(weights=None).eval()
    stages = distance.mobilenet_stages(cnn)
    pixels = torch.randn(1, 3, 64, 64, device="meta")
    rf = assert_stays_on_device(distance.effective_receptive_fields, cnn, stages, pixels)
    assert rf.erf_maps.shape == (len(stages), 64, 64) and rf.erf_maps.device.type == "meta"


def test_attention_views(on_meta):
    model, pixels = on_meta

    def views():
        maps = attention.capture(model, pixels)
        return attention_view.attention_views(maps, len(model.blocks) - 1)

    assert_stays_on_device(views)


def test_class_relevance():
    model = odd_vit().to("meta")
    assert_stays_on_device(attention.class_relevance, model, torch.randn(1, 3, 48, 64,
                                                                          device="meta"))


def test_callback_prologue_puts_pixels_on_the_models_device(monkeypatch):
    model = odd_vit().to("meta")
    config = timm.data.resolve_model_data_config(model)
    monkeypatch.setattr(models, "load_vit", lambda name=None, device=None: (model, config))
    _, _, pixels = common.model_and_pixels(str(images.EXAMPLES_DIR / "rocket.jpg"), "any",
                                           0, 0, "crop")
    assert pixels.device.type == "meta" and pixels.shape == (1, 3, 64, 64)


def test_no_numpy_without_cpu_in_explorer():
    """A CUDA tensor's ``.numpy()`` raises: every call in the package goes through ``.cpu()``
    (``explorer.plots.colors.as_array`` for the views)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "explorer"
    bare = re.compile(r"(?<!\.cpu\(\))\.numpy\(\)")
    offenders = [f"{path.relative_to(root.parent)}:{i}"
                 for path in sorted(root.rglob("*.py"))
                 for i, line in enumerate(path.read_text().splitlines(), 1) if bare.search(line)]
    assert not offenders, offenders
