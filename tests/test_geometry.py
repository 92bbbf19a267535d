"""Every tab with a ViT of unusual shape: the controls and labels follow the model.

The model (`tests.odd_vit`): 3 blocks, 5 heads, 16 px patches, one register token, no
class token, 64 px native, 4 classes; saved with timm's `save_for_hf` and registered by
name, so the endpoints load it exactly as they load any local checkpoint.
"""

from __future__ import annotations

import gradio as gr
import pytest
import timm
import torch
from gradio_client import Client, handle_file

import app
from explorer import attention, datasets, images, models, patches
from explorer.plots import distance as distance_plots
from explorer.ui import (
    attention_tab,
    attention_view,
    common,
    distance_tab,
    finetune_tab,
    igpt_tab,
    tokens_tab,
)
from tests import odd_vit
from tests.odd_vit import CLASS_NAMES, DEPTH, HEADS, PATCH, SIZE

IMAGE = "assets/examples/chelsea.jpg"
GRID = SIZE // PATCH  # 4x4 patches at the native 64 px


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    return odd_vit.register_odd_vit(tmp_path_factory.mktemp("odd-vit"))


def _value(update):
    """The value an update sets (a component built as an update, or a plain value)."""
    return update.value if isinstance(update, gr.components.Component) else update


# ---------------------------------------------------------------------------------------
# The geometry itself, by hand
# ---------------------------------------------------------------------------------------


def test_geometry_read_from_the_model(odd):
    model, config = models.load_vit(odd)
    g = patches.model_geometry(model, config)
    assert (g.depth, g.num_heads, g.patch) == (DEPTH, HEADS, (PATCH, PATCH))
    assert g.native_size == g.default_size == (SIZE, SIZE)
    assert g.prefix_names == ("REG1",) and not g.class_token
    assert g.default_grid == (GRID, GRID)


@pytest.mark.parametrize(("native", "patch", "expected"), [
    ((518, 518), (14, 14), (224, 224)),  # DINOv2: 37 patches a side -> 16
    ((224, 224), (16, 16), (224, 224)),  # 14 a side: kept
    ((480, 640), (16, 16), (192, 256)),  # 30x40 -> 12x16, aspect kept
    ((64, 64), (16, 16), (64, 64)),
    ((16, 4000), (16, 16), (16, 256)),  # never below one patch
])
def test_default_size_caps_the_grid(native, patch, expected):
    assert patches.default_size(native, patch) == expected


def test_geometry_of_a_deit_with_distillation_token():
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=2)
    g = patches.model_geometry(model, timm.data.resolve_model_data_config(model))
    assert (g.depth, g.num_heads, g.prefix_names, g.class_token) == (2, 3, ("CLS", "DIST"), True)


# ---------------------------------------------------------------------------------------
# Each tab's endpoints
# ---------------------------------------------------------------------------------------


def test_sizes_default_to_the_model(odd):
    model, config = models.load_vit(odd)
    assert common.resolution_for(model, config, 0, 0) == (SIZE, SIZE)
    assert common.resolution_for(model, config, 96, 0) == (SIZE, 96)  # one side typed
    assert common.resolution_for(model, config, 100, 50) == (48, 96)  # snapped to 16 px


def test_tokens_tab(odd):
    views = tokens_tab.tokens(IMAGE, odd, 0, 0, "crop")
    assert tuple(views) == tokens_tab.VIEWS
    summary, grid = views["summary"], views["grid"]
    assert f"**{SIZE}x{SIZE} px** -> grid of **{GRID}x{GRID}**" in summary
    assert f"**{GRID * GRID}** patch tokens + 1 prefix (REG1)" in summary
    assert "CLS" not in summary
    zoom = grid.shape[0] // SIZE
    assert grid.shape[:2] == (SIZE * zoom, SIZE * zoom)
    # wider than tall: the grid becomes 6x4
    summary = tokens_tab.tokens(IMAGE, odd, 96, 64, "crop")["summary"]
    assert f"grid of **{96 // PATCH}x{GRID}**" in summary


def test_attention_controls_follow_the_model(odd):
    controls = attention_tab.model_controls(odd)
    assert tuple(controls) == attention_tab.CONTROLS
    layer, start, head, heads, strip, rollout = controls.values()
    assert (layer.maximum, _value(layer)) == (DEPTH, DEPTH)
    assert (start.maximum, _value(start)) == (DEPTH, 1)
    choices = [c[0] if isinstance(c, tuple) else c for c in head.choices]
    assert choices == ["mean", "max", "min"] + [f"head {h}" for h in range(1, HEADS + 1)]
    for caption in (heads, strip, rollout):  # the captions above the views
        assert "class token" not in caption.lower() and "mean over patch queries" in caption.lower()
    # the default model, which has a class token, says so
    dino = patches.ModelGeometry(12, 6, (14, 14), (518, 518), (224, 224), ("CLS",), True)
    assert "class token" in attention_tab.view_labels(dino)["rollout_caption"]


def test_attention_analysis_and_query(odd):
    out = attention_tab.analyse_and_render(IMAGE, odd, 0, 0, "crop", 99, "mean", "mean", 0.0, 1,
                                           0.6, 0.6, "inferno", "head 9")
    session, summary = out["session"], out["summary"]
    assert f"{GRID}x{GRID} patches, {DEPTH} layers x {HEADS} heads, prefix: REG1." in summary
    prefix_fig = out["prefix_plot"]
    assert [t.name for t in prefix_fig.data] == ["REG1", "all patches"]
    assert len(prefix_fig.data[0].x) == DEPTH
    assert any(f"**{name}**" in out["relevance_note"] for name in CLASS_NAMES)
    layer, head = out["layer"], out["query_head"]
    assert (layer.maximum, _value(layer)) == (DEPTH, DEPTH)  # 99 clamped to the last layer
    assert _value(head) == "mean"  # "head 9" does not exist here
    for name in ("heads", "strip", "rollout"):  # the new model's captions, with its pictures
        assert "class token" not in out[f"{name}_caption"].lower()
        assert out[name] is not None and out[name].ndim == 3

    info = attention_tab.query(session, 1, 2, DEPTH, f"head {HEADS}", 0.6, "inferno")["query_info"]
    assert f"layer {DEPTH}, head: head {HEADS}" in info
    assert f"(token {1 + 1 * GRID + 2})" in info  # after the one register token
    with pytest.raises(gr.Error, match="head must be in"):
        attention_tab.query(session, 1, 2, DEPTH, f"head {HEADS + 1}", 0.6, "inferno")


def test_rollout_of_a_model_without_class_token_is_the_patches_mean(odd):
    """With registers but no class token the view shows the patch queries' mean rollout,
    not register 1's row (the old view model took row 0 whenever any prefix token existed)."""
    model, config = models.load_vit(odd)
    pixels = common.model_and_pixels(IMAGE, odd, 0, 0, "crop")[2]
    maps = attention.capture(model, pixels)
    expected = attention.attention_rollout(maps)[0, 1:, 1:].mean(dim=0).reshape(GRID, GRID)
    shown = attention_view.attention_views(maps, DEPTH - 1).rollout
    torch.testing.assert_close(shown, expected)


def test_distance_tab(odd):
    out = distance_tab.per_image(IMAGE, odd, [], True, True, 0, 0, "crop", "drop", None)
    fig, erf, info = out["plot"], out["erf"], out["info"]
    odd_trace, random_trace = fig.data[0], fig.data[1]
    assert odd_trace.name == odd and random_trace.name == distance_tab.RANDOM_LABEL
    assert len(odd_trace.y) == DEPTH * HEADS
    assert sorted({int(h) for _, h in odd_trace.customdata}) == list(range(1, HEADS + 1))
    assert sorted({int(layer) for layer, _ in odd_trace.customdata}) == list(range(1, DEPTH + 1))
    assert fig.layout.xaxis.range[1] == pytest.approx(DEPTH + 0.6)
    assert f"at {SIZE}x{SIZE} px" in info
    assert erf is not None and erf.ndim == 3


def test_cnn_stages_spread_over_the_actual_stages():
    assert distance_plots.spread_stages(19) == [0, 3, 6, 9, 12, 15, 18]
    assert distance_plots.spread_stages(4) == [0, 1, 2, 3]
    assert distance_plots.spread_stages(1) == [0]


def test_distance_dataset_band(odd):
    band, info = distance_tab.dataset_band(odd, "bundled examples", 4, "", 0, 0, "drop",
                                           progress=lambda *a, **k: None)
    label, legend, mean, std = band
    assert label == odd and "mean ± std over 4 images" in legend
    assert f"4 images (bundled examples) at {SIZE}x{SIZE}" in info
    # By hand, image by image: each patch query's attention over the patch keys (prefix
    # dropped, renormalised), weighted by centre-to-centre pixel distance, averaged.
    model, config = models.load_vit(odd)
    centres = [((r + 0.5) * PATCH, (c + 0.5) * PATCH) for r in range(GRID) for c in range(GRID)]
    dist = torch.tensor([[((y0 - y1) ** 2 + (x0 - x1) ** 2) ** 0.5 for y1, x1 in centres]
                         for y0, x0 in centres], dtype=torch.float64)
    per_image = []
    for photo in images.example_paths()[:4]:
        pixels = images.prepare_pixels(images.open_image(photo), config, (SIZE, SIZE))
        probs = attention.capture(model, pixels).stack()[:, 0].double()  # (L, H, N, N)
        rows = probs[:, :, 1:, 1:]  # patch queries, patch keys (one register token first)
        rows = rows / rows.sum(dim=-1, keepdim=True)
        per_image.append((rows * dist).sum(dim=-1).mean(dim=-1))  # (L, H)
    by_hand = torch.stack(per_image)
    torch.testing.assert_close(mean.double().cpu(), by_hand.mean(dim=0), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(std.double().cpu(), by_hand.std(dim=0), rtol=1e-3, atol=1e-3)
    assert float(std.max()) > 0  # four different photos do not attend alike


def test_finetune_controls_follow_the_model(odd):
    last_k, probe_block = finetune_tab.depth_controls(odd)
    assert (last_k.maximum, _value(last_k)) == (DEPTH, min(finetune_tab.DEFAULT_LAST_K, DEPTH))
    assert probe_block.maximum == DEPTH and f"{DEPTH} blocks" in probe_block.info


@pytest.mark.skipif(not datasets.FASHION_MNIST_DIR.is_dir(),
                    reason="needs Debian's dataset-fashion-mnist")
def test_finetune_rejects_a_block_the_model_lacks(odd):
    with pytest.raises(gr.Error, match=f"has {DEPTH} blocks"):
        next(finetune_tab.train(finetune_tab.BUILTIN, None, 50, odd,
                                "Linear probe (frozen backbone)", 1, 0, 1, 0, 16, DEPTH + 1,
                                progress=lambda *a, **k: None))


def test_igpt_rows_follow_the_image_height():
    slider = igpt_tab.rows_slider(32)
    assert (slider.maximum, _value(slider)) == (31, 16)
    offline = igpt_tab.rows_for_model(igpt_tab.OFFLINE_NAME)
    assert offline.maximum == igpt_tab.model_height(igpt_tab.OFFLINE_NAME) - 1


# ---------------------------------------------------------------------------------------
# The same through the running app's API
# ---------------------------------------------------------------------------------------


def test_api_geometry_endpoints(odd):
    demo = app.build_demo()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        layer, start, head, heads, strip, rollout = client.predict(odd,
                                                                   api_name="/attention_geometry")
        assert (layer["maximum"], layer["value"], start["maximum"], start["value"]) == (
            DEPTH, DEPTH, DEPTH, 1)
        assert [c[0] for c in head["choices"]][-1] == f"head {HEADS}"
        assert len(head["choices"]) == 3 + HEADS
        assert "class token" not in rollout.lower() and "patch queries" in rollout.lower()
        last_k, probe_block = client.predict(odd, api_name="/finetune_geometry")
        assert (last_k["maximum"], probe_block["maximum"]) == (DEPTH, DEPTH)
        summary = client.predict(handle_file(IMAGE), odd, 0, 0, "crop", api_name="/tokens")[0]
        assert f"grid of **{GRID}x{GRID}**" in summary and "(REG1)" in summary
    finally:
        demo.close()


def test_build_time_geometry_is_the_loaded_default_models():
    """Controls start from the default's architecture built on meta: the same geometry as
    the loaded weights give."""
    model, config = models.load_vit(None)
    assert models.vit_geometry(None) == patches.model_geometry(model, config)


def test_pickers_read_geometry_without_loading_weights(odd, monkeypatch):
    """A model change reads the checkpoint's config.json on the meta device: the same
    geometry as the loaded model, and no weights are built or read."""
    model, config = models.load_vit(odd)
    loaded = patches.model_geometry(model, config)

    def no_weights(*args, **kwargs):
        raise AssertionError("a picker change loaded the model")

    monkeypatch.setattr(models, "build_vit", no_weights)
    monkeypatch.setattr(models, "load_vit", no_weights)
    assert models.vit_geometry(odd) == loaded
    assert attention_tab.model_controls(odd)["layer"].maximum == DEPTH
    last_k, probe_block = finetune_tab.depth_controls(odd)
    assert probe_block.maximum == DEPTH
    entry = models.CATALOGUE["deit_small_distilled_patch16_224.fb_in1k"]  # a hub entry, offline
    g = models.vit_geometry(entry.name)
    assert (g.depth, g.num_heads, g.patch, g.prefix_names) == (12, 6, (16, 16), ("CLS", "DIST"))


def test_an_unavailable_model_leaves_the_controls_alone(tmp_path):
    assert common.model_geometry(f"local:{tmp_path / 'nothing-here'}") is None
    assert common.model_geometry("resnet18") is None  # not a ViT
    assert attention_tab.model_controls(f"local:{tmp_path / 'nothing-here'}") == {}
    assert finetune_tab.depth_controls("no_such_model_anywhere") == (gr.skip(), gr.skip())
