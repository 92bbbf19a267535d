"""The fine-tuning engine on a tiny timm ViT (fast), plus one run of the real default model."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from explorer import datasets
from explorer.finetune import (
    FEATURE_CACHE,
    FinetuneConfig,
    finetune,
    position_similarity_map,
    run_finetune,
    save_checkpoint,
)
from explorer.finetune.__main__ import main as cli_main
from explorer.finetune.data import PixelDataset
from explorer.finetune.probe import (
    PROBE_RECIPE,
    ProbeRecipe,
    fit_linear_classifier,
    layer_features,
    layerwise_probe,
    pre_logits,
    probe_accuracy,
    train_linear_probe,
)
from explorer.models import load_vit, model_names, register_local_model
from explorer.patches import patch_position_embedding

pytestmark = pytest.mark.skipif(not datasets.FASHION_MNIST_DIR.is_dir(),
                                reason="needs Debian's dataset-fashion-mnist")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP barrier stalls when
    the other core is busy (BENCHMARKS.md, Fine-tuning: one torch thread beat two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vit(seed: int = 0, img_size: int = 32) -> torch.nn.Module:
    """timm's registered test ViT (dim 64, 6 blocks, patch 16): builds in ms, no download."""
    torch.manual_seed(seed)
    return timm.create_model("test_vit", pretrained=False, dynamic_img_size=True,
                             img_size=img_size)


@pytest.fixture(scope="module")
def data():
    full = datasets.fashion_mnist("train", 120, seed=0)
    return datasets.train_val_split(full, 0.25, seed=0)


def pixels_of(images: datasets.ImageSet, model: torch.nn.Module, size) -> torch.Tensor:
    config = timm.data.resolve_model_data_config(model)
    dataset = PixelDataset(images, config, size)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def mean_loss(model, images, size) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(pixels_of(images, model, size))
    return float(F.cross_entropy(logits, torch.as_tensor(images.labels)))


def test_few_steps_reduce_training_loss(data):
    train, val = data
    model = tiny_vit()
    config = FinetuneConfig(mode="full", epochs=4, batch_size=16, lr=2e-3, augment=False,
                            warmup_frac=0.0)
    result = finetune(model, train, val, config)
    first = result.history[0]["loss"]
    assert len([h for h in result.history if "loss" in h]) == 4 * 6  # 90 images / 16 per step
    assert mean_loss(result.model, train, result.resolution) < 0.8 * first
    assert np.isfinite([h.get("loss", 0) for h in result.history]).all()
    # The reported validation is the trained model's own predictions, counted right.
    with torch.no_grad():
        preds = result.model(pixels_of(val, result.model, result.resolution)).argmax(-1)
    assert np.array_equal(preds.numpy(), result.val_preds)
    assert result.val_acc == pytest.approx(float((preds.numpy() == val.labels).mean()))
    assert np.trace(result.confusion) == round(result.val_acc * len(val))
    assert result.confusion.sum() == len(val)


def test_same_seed_same_run_other_seed_differs(data):
    train, val = data
    runs = []
    for seed in (3, 3, 4):
        config = FinetuneConfig(mode="last_k", last_k=1, epochs=1, batch_size=16, lr=1e-3,
                                seed=seed)
        runs.append(finetune(tiny_vit(), train, val, config))
    losses = [[h["loss"] for h in r.history if "loss" in h] for r in runs]
    assert losses[0] == losses[1]
    assert all(torch.equal(a, b) for a, b in zip(runs[0].model.state_dict().values(),
                                                 runs[1].model.state_dict().values(),
                                                 strict=True))
    assert losses[0] != losses[2]


def test_last_k_trains_only_the_last_blocks(data):
    train, val = data
    before = tiny_vit().state_dict()
    result = finetune(tiny_vit(), train, val,
                      FinetuneConfig(mode="last_k", last_k=2, max_steps=2, batch_size=16))
    after = result.model.state_dict()
    changed = {k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("blocks") else "")
               for k in before if k in after and before[k].shape == after[k].shape
               and not torch.equal(before[k], after[k])}
    assert changed == {"blocks.4", "blocks.5", "norm"}  # head is new, so not compared


def test_gradient_accumulation_matches_a_bigger_batch(data):
    train, val = data
    common = dict(mode="full", max_steps=2, lr=1e-3, augment=False, warmup_frac=0.0)
    big = finetune(tiny_vit(), train, val, FinetuneConfig(batch_size=16, **common))
    accumulated = finetune(tiny_vit(), train, val,
                           FinetuneConfig(batch_size=8, grad_accum=2, **common))
    assert [h["step"] for h in accumulated.history if "loss" in h] == [1, 2]
    for a, b in zip(big.model.parameters(), accumulated.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_linear_probe_caches_features_and_head_matches_probe(data):
    train, val = data
    FEATURE_CACHE.clear()
    config = FinetuneConfig(mode="linear", epochs=3, batch_size=16)
    first_events = list(run_finetune(tiny_vit(), train, val, config))
    second_events = list(run_finetune(tiny_vit(), train, val, config))
    first, second = first_events[-1].result, second_events[-1].result
    assert not first.feature_cache_hit and second.feature_cache_hit
    assert any(e.stage.startswith("features") for e in first_events)
    assert not any(e.stage.startswith("features") for e in second_events)
    assert first.val_acc == second.val_acc
    # The standardisation folded into the head: the whole model predicts what the probe did.
    with torch.no_grad():
        preds = first.model(pixels_of(val, first.model, first.resolution)).argmax(-1)
    assert np.array_equal(preds.numpy(), first.val_preds)
    # Only the head moved: the backbone is the untouched random init.
    fresh = tiny_vit().state_dict()
    for name, tensor in first.model.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(tensor, fresh[name]), name
    # The head is the one probe trainer's, run with the config's epochs, batch, lr and seed.
    model = tiny_vit().eval()
    with torch.no_grad():
        features = pre_logits(model, pixels_of(train, model, (32, 32)))
    recipe = ProbeRecipe(steps=3 * 6, lr=PROBE_RECIPE.lr, weight_decay=PROBE_RECIPE.weight_decay,
                         batch_size=16, seed=0)  # 90 images / 16 per batch = 6 steps per epoch
    head = fit_linear_classifier(features, torch.as_tensor(train.labels), 10, recipe)
    torch.testing.assert_close(first.model.head.weight, head.weight, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(first.model.head.bias, head.bias, atol=1e-4, rtol=1e-4)
    assert [h["step"] for h in first.history if "loss" in h] == list(range(1, 19))
    assert [h["step"] for h in first.history if "val_acc" in h] == [6, 12, 18]  # per epoch


def plain_timm(out) -> torch.nn.Module:
    """The checkpoint as anyone with timm alone loads it: no explorer code involved."""
    return timm.create_model(f"local-dir:{out}", pretrained=True).eval()


def assert_same_logits(loaded, model, x):
    """Identical weights and graph on the same CPU: the logits agree bit for bit."""
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_checkpoint_reloads_with_identical_logits_in_plain_timm(data, tmp_path):
    train, val = data
    config = FinetuneConfig(mode="last_k", last_k=1, max_steps=3, batch_size=16)
    result = finetune(tiny_vit(), train, val, config)
    out = save_checkpoint(result, tmp_path / "ckpt", "test_vit (random init)", config)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["architecture"] == "test_vit" and meta["num_classes"] == len(train.classes)
    assert meta["label_names"] == train.classes
    record = meta["fine_tune"]
    assert record["base_model"] == "test_vit (random init)" and record["resolution"] == [32, 32]
    assert record["metrics"]["val_acc"] == pytest.approx(result.val_acc)
    x = pixels_of(val, result.model, (32, 32))
    reloaded = plain_timm(out)
    assert reloaded.pretrained_cfg["label_names"] == train.classes
    assert tuple(timm.data.resolve_model_data_config(reloaded)["input_size"]) == (3, 32, 32)
    assert_same_logits(reloaded, result.model, x)
    # The app's loader goes through the same timm path and keeps the class names.
    loaded, data_config = load_vit(f"local:{out}", device="cpu")
    assert tuple(data_config["input_size"]) == (3, 32, 32) and data_config["crop_pct"] == 1.0
    assert loaded.class_names == train.classes
    assert_same_logits(loaded, result.model, x)
    with torch.no_grad():
        assert np.array_equal(loaded(x).argmax(-1).numpy(), result.val_preds)
    name = register_local_model("fine-tuned: tiny test", out)  # how an operator model is named
    assert name in model_names()
    assert_same_logits(load_vit(name, device="cpu")[0], result.model, x)


def test_probe_block_truncates_and_reloads_with_identical_predictions(data, tmp_path):
    train, val = data
    FEATURE_CACHE.clear()
    config = FinetuneConfig(mode="linear", epochs=2, batch_size=16, probe_block=3)
    result = finetune(tiny_vit(), train, val, config)
    assert len(result.model.blocks) == 3 and not result.feature_cache_hit
    # The probe read the class token after block 3 (then the final norm): what the layer-wise
    # probe calls block 3's class-token part.
    x = pixels_of(val, result.model, (32, 32))
    with torch.no_grad():
        feats = result.model.forward_head(result.model.forward_features(x), pre_logits=True)
        per_block = layer_features(tiny_vit(), x)
        torch.testing.assert_close(feats, per_block[:, 2, :feats.shape[1]], atol=1e-5,
                                   rtol=1e-5)
    out = save_checkpoint(result, tmp_path / "block3", "test_vit", config)
    meta = json.loads((out / "config.json").read_text())
    assert meta["model_args"]["depth"] == 3 and meta["fine_tune"]["train_config"]["probe_block"] == 3
    loaded = plain_timm(out)
    assert isinstance(loaded, timm.models.VisionTransformer) and len(loaded.blocks) == 3
    assert_same_logits(loaded, result.model, x)
    with torch.no_grad():
        assert np.array_equal(loaded(x).argmax(-1).numpy(), result.val_preds)
    # The full model's features are cached under another key: no stale block-3 features.
    full = finetune(tiny_vit(), train, val, FinetuneConfig(mode="linear", epochs=2,
                                                           batch_size=16))
    assert not full.feature_cache_hit and len(full.model.blocks) == 6
    # Mean patch token after block 3 (timm global_pool "avg" with the norm before pooling).
    config = FinetuneConfig(mode="linear", epochs=2, batch_size=16, probe_block=3,
                            probe_pool="avg")
    avg = finetune(tiny_vit(), train, val, config)
    assert not avg.feature_cache_hit and avg.model.global_pool == "avg"
    with torch.no_grad():
        feats = avg.model.forward_head(avg.model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(feats, per_block[:, 2, feats.shape[1]:], atol=1e-5,
                                   rtol=1e-5)
    out = save_checkpoint(avg, tmp_path / "block3avg", "test_vit", config)
    meta = json.loads((out / "config.json").read_text())
    assert {k: meta["model_args"][k] for k in ("depth", "global_pool", "fc_norm")} == {
        "depth": 3, "global_pool": "avg", "fc_norm": False}
    loaded = plain_timm(out)
    assert loaded.global_pool == "avg" and len(loaded.blocks) == 3
    assert isinstance(loaded.fc_norm, torch.nn.Identity)  # the norm stays before pooling
    assert_same_logits(loaded, avg.model, x)
    with torch.no_grad():
        assert np.array_equal(loaded(x).argmax(-1).numpy(), avg.val_preds)
    with pytest.raises(ValueError):
        FinetuneConfig(mode="full", probe_block=3)
    with pytest.raises(ValueError):
        FinetuneConfig(mode="linear", probe_pool="max")
    with pytest.raises(ValueError):
        finetune(tiny_vit(), train, val, FinetuneConfig(mode="linear", probe_block=7))


def test_new_resolution_interpolates_position_embeddings(data, tmp_path):
    train, val = data
    model = tiny_vit(img_size=64)  # native grid 4x4
    expected = patch_position_embedding(model, grid=(6, 6)).clone()
    config = FinetuneConfig(mode="linear", resolution=90, epochs=1)  # snaps to 96 = 6 patches
    result = finetune(model, train, val, config)
    assert result.resolution == (96, 96)
    assert result.model.pos_embed.shape == (1, 1 + 36, 64)
    # Linear mode leaves the backbone alone: the embeddings are exactly the interpolation.
    torch.testing.assert_close(patch_position_embedding(result.model), expected)
    sim = position_similarity_map(result.model)
    assert sim.shape == (6, 6, 6, 6)
    torch.testing.assert_close(torch.einsum("ijij->ij", sim), torch.ones(6, 6))
    out = save_checkpoint(result, tmp_path / "hires", "test_vit", config)
    loaded = plain_timm(out)
    assert loaded.pos_embed.shape == (1, 37, 64)
    assert tuple(timm.data.resolve_model_data_config(loaded)["input_size"]) == (3, 96, 96)
    assert_same_logits(loaded, result.model, pixels_of(val, result.model, (96, 96)))


def test_cancel_stops_between_batches(data):
    train, val = data
    cancel = threading.Event()
    events = []
    for event in run_finetune(tiny_vit(), train, val,
                              FinetuneConfig(mode="full", epochs=5, batch_size=8), cancel):
        events.append(event)
        if event.stage == "train" and event.done == 2:
            cancel.set()
    assert events[-1].stage == "cancelled" and events[-1].result.cancelled
    assert [e.done for e in events if e.stage == "train"] == [1, 2]
    assert not any(e.stage == "eval" for e in events)


def test_layerwise_probe_on_tiny_model(data):
    train, val = data
    model = tiny_vit().eval()

    def batches(images):
        x = pixels_of(images, model, (32, 32))
        return [(x[i:i + 32], torch.as_tensor(images.labels[i:i + 32]))
                for i in range(0, len(x), 32)]

    feats = layer_features(model, batches(val)[0][0])
    assert feats.shape == (30, 6, 128)  # 6 blocks, class token + mean patch (2 x 64)
    last = list(layerwise_probe(lambda x: layer_features(model, x), batches(train),
                                batches(val), 10, "tiny", steps=50))[-1]
    assert last[0] == "done"
    probe = last[2]
    assert probe.depths == [1, 2, 3, 4, 5, 6]
    # Each depth's numbers are the one trainer's on that block's features, batches in order.
    with torch.no_grad():
        train_x = layer_features(model, pixels_of(train, model, (32, 32)))
        val_x = layer_features(model, pixels_of(val, model, (32, 32)))
    train_y, val_y = torch.as_tensor(train.labels), torch.as_tensor(val.labels)
    for layer in (0, 5):
        linear = fit_linear_classifier(train_x[:, layer], train_y, 10, ProbeRecipe(steps=50))
        assert probe.train_acc[layer] == probe_accuracy(linear, train_x[:, layer], train_y)
        assert probe.val_acc[layer] == probe_accuracy(linear, val_x[:, layer], val_y)


def blobs(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes around (0, 0), (10, 0), (0, 10), noise 0.5: linearly separable (the
    nearest gap between blobs is 7 sigma wide), in wildly different units per feature."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    y = torch.arange(3).repeat_interleave(n_per_class)
    x = centres[y] + 0.5 * torch.randn(len(y), 2, generator=g)
    return x * torch.tensor([1000.0, 0.001]) + torch.tensor([500.0, -3.0]), y


def test_probe_separates_separable_data_completely():
    train_x, train_y = blobs(20, seed=0)
    val_x, val_y = blobs(10, seed=1)
    linear = fit_linear_classifier(train_x, train_y, 3)  # the default recipe, full batch
    assert probe_accuracy(linear, train_x, train_y) == 1.0
    assert probe_accuracy(linear, val_x, val_y) == 1.0
    # Minibatches with a seed: the same recipe still gets there.
    mini = fit_linear_classifier(train_x, train_y, 3, ProbeRecipe(steps=300, batch_size=8))
    assert probe_accuracy(mini, val_x, val_y) == 1.0


def test_probe_on_uninformative_features_learns_the_class_priors():
    # Constant features carry no information: the cross-entropy optimum predicts the class
    # frequencies for every input, softmax(b) = (0.6, 0.3, 0.1), and the weight stays zero.
    y = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    x = torch.full((100, 4), 7.0)
    linear = fit_linear_classifier(x, y, 3, ProbeRecipe(steps=600, lr=0.05))
    torch.testing.assert_close(linear(x[:1]).softmax(-1)[0], torch.tensor([0.6, 0.3, 0.1]),
                               atol=5e-3, rtol=0)
    assert linear.weight.abs().max() == 0
    assert probe_accuracy(linear, x, y) == 0.6  # always the majority class


def test_probe_trainer_reports_steps_and_stops_on_cancel():
    x, y = blobs(4, seed=0)
    steps = list(train_linear_probe(x, y, 3, ProbeRecipe(steps=6, batch_size=5)))
    assert [s.step for s in steps] == list(range(1, 7))
    assert [s.epoch_done for s in steps] == [False, False, True] * 2  # 12 rows, 5 per batch
    assert [s.seen for s in steps] == [5, 10, 12, 17, 22, 24]
    assert steps[0].lr == PROBE_RECIPE.lr and steps[-1].lr < steps[0].lr  # cosine decay
    assert steps[0].loss == pytest.approx(np.log(3))  # a zero head predicts uniformly
    cancel = threading.Event()
    training = train_linear_probe(x, y, 3, ProbeRecipe(steps=6), cancel)
    next(training)
    cancel.set()
    with pytest.raises(StopIteration) as stop:
        next(training)
    assert stop.value.value is None


def test_layerwise_probe_finds_the_informative_layer():
    # Layer 1 is constant (no information), layer 2 is the one-hot label (separable).
    def features_fn(labels):
        return torch.stack([torch.zeros(len(labels), 3),
                            F.one_hot(labels, 3).float()], dim=1)

    train_y = torch.tensor([0] * 6 + [1] * 3 + [2] * 3)
    val_y = torch.tensor([0, 0, 1, 1, 2, 2])
    events = list(layerwise_probe(features_fn, [(train_y[:8], train_y[:8]),
                                                (train_y[8:], train_y[8:])],
                                  [(val_y, val_y)], 3, "hand-made"))
    assert [e[:2] for e in events[:3]] == [("features", 1), ("features", 2), ("features", 3)]
    probe = events[-1][2]
    assert probe.depths == [1, 2] and probe.best_depth == 2
    assert probe.train_acc == [0.5, 1.0]  # constant features: the majority class, 6 of 12
    assert probe.val_acc[0] == pytest.approx(1 / 3) and probe.val_acc[1] == 1.0


def save_base(model: torch.nn.Module, directory) -> None:
    """A base model on disk in timm's layout, for `--model local:<dir>`."""
    timm.models.save_for_hf(model, str(directory), safe_serialization=True)


def test_cli_trains_and_saves(tmp_path, capsys):
    base_dir = tmp_path / "base"
    save_base(tiny_vit(), base_dir)
    code = cli_main(["--fashion-mnist", "60", "--model", f"local:{base_dir}", "--mode", "full",
                     "--max-steps", "2", "--batch-size", "8", "--out", str(tmp_path / "out")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "step 2/2" in printed and "done: val_acc" in printed
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert meta["fine_tune"]["mode"] == "full" and meta["num_classes"] == 10
    assert meta["fine_tune"]["base_model"] == f"local:{base_dir}"
    assert plain_timm(tmp_path / "out").num_classes == 10
    code = cli_main(["--fashion-mnist", "60", "--model", f"local:{base_dir}", "--mode", "linear",
                     "--probe-block", "2", "--epochs", "1", "--out", str(tmp_path / "b2")])
    assert code == 0
    meta = json.loads((tmp_path / "b2" / "config.json").read_text())
    assert meta["model_args"]["depth"] == 2
    assert len(plain_timm(tmp_path / "b2").blocks) == 2
    assert cli_main(["--data", str(tmp_path / "missing"), "--model", "x"]) == 2


@pytest.mark.slow
def test_default_model_linear_probe_on_fashion_mnist():
    """The real offline DINOv2 ViT-S/14: a linear probe on 200 images beats chance by far."""
    train = datasets.fashion_mnist("train", 200, seed=1)
    val = datasets.fashion_mnist("test", 100, seed=1)
    from explorer.models import build_vit

    result = finetune(build_vit(None), train, val,
                      FinetuneConfig(mode="linear", resolution=56, epochs=15, batch_size=32),
                      model_key="default")
    assert result.resolution == (56, 56)
    assert result.val_acc > 0.6  # chance is 0.1 (BENCHMARKS.md, Fine-tuning: linear probe)


def test_igpt_layerwise_probe_with_a_small_random_igpt(data):
    from explorer.finetune.igpt_probe import igpt_layer_features, igpt_layerwise, igpt_tokens
    from explorer.igpt.checkpoint import LoadedIGPT
    from explorer.igpt.model import IGPTConfig, ImageGPT
    from explorer.igpt.palette import grey_palette

    train, val = data
    torch.manual_seed(0)
    model = ImageGPT(IGPTConfig(vocab_size=9, n_positions=784, n_embd=32, n_layer=3, n_head=2))
    loaded = LoadedIGPT("tiny iGPT", model.eval(), grey_palette(8), 28, 28)
    tokens = igpt_tokens(val, np.arange(4), loaded.palette, 28, 28)
    assert tokens.shape == (4, 28, 28) and int(tokens.max()) < 8
    assert igpt_layer_features(model, tokens).shape == (4, 3, 32)
    *_, (stage, _, probe) = igpt_layerwise(loaded, train, val, steps=30)
    assert stage == "done" and probe.depths == [1, 2, 3] and probe.model_name == "tiny iGPT"
    # The same trainer on the same pooled features of every image, labels in order.
    def all_features(images):
        return igpt_layer_features(model, igpt_tokens(images, np.arange(len(images)),
                                                      loaded.palette, 28, 28))

    train_x, val_x = all_features(train), all_features(val)
    train_y, val_y = torch.as_tensor(train.labels), torch.as_tensor(val.labels)
    for layer in range(3):
        linear = fit_linear_classifier(train_x[:, layer], train_y, 10, ProbeRecipe(steps=30))
        assert probe.train_acc[layer] == pytest.approx(
            probe_accuracy(linear, train_x[:, layer], train_y), abs=1.5 / len(train))
        assert probe.val_acc[layer] == pytest.approx(
            probe_accuracy(linear, val_x[:, layer], val_y), abs=1.5 / len(val))


def test_plot_builders(data):
    from explorer.finetune.probe import LayerwiseProbe
    from explorer.plots import finetune as plots

    train, val = data
    history = [{"step": 1, "loss": 2.0, "acc": 0.1}, {"step": 2, "loss": 1.5, "acc": 0.3},
               {"step": 2, "val_loss": 1.6, "val_acc": 0.25}]
    curves = plots.training_curves(history)
    assert [len(t.x) for t in curves.data] == [2, 1, 2, 1]  # loss/acc x train/validation
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([1, 1, 1, 0, 2, 0])
    assert list(plots.misclassified_indices(labels, preds)) == [0, 3, 5, 1]  # class round robin
    conf = np.array([[3, 1], [0, 4]])
    heat = plots.confusion_figure(conf, ["a", "b"]).data[0]
    np.testing.assert_allclose(heat.z, [[0.75, 0.25], [0.0, 1.0]])
    grid = plots.misclassified_grid(val, val.labels, (val.labels + 1) % 10, max_items=5, tile=32)
    assert grid.dtype == np.uint8 and grid.shape[1] == 5 * 32 + 6 * 3
    assert plots.misclassified_grid(val, val.labels, val.labels) is None
    probes = [LayerwiseProbe([1, 2, 3], [0.5, 0.7, 0.6], [0.4, 0.6, 0.5], "a"),
              LayerwiseProbe([1, 2], [0.5, 0.9], [0.4, 0.8], "b")]
    assert probes[0].best_depth == 2
    depth = plots.probe_depth_figure(probes)
    assert list(depth.data[2].x) == [0.5, 1.0]  # different depths: relative x


def test_tab_turns_bad_data_into_clear_gradio_errors(tmp_path):
    import zipfile

    import gradio as gr

    from explorer.ui import finetune_tab as tab

    with pytest.raises(gr.Error, match="Upload a .zip"):
        tab.describe_data(tab.UPLOAD, None, 100)
    one_class = tmp_path / "one.zip"
    with zipfile.ZipFile(one_class, "w") as zf:
        for i in range(12):
            zf.writestr(f"cats/{i}.png", datasets_png(i))
    with pytest.raises(gr.Error, match="Only one class folder"):
        tab.describe_data(tab.UPLOAD, str(one_class), 100)
    summary, figure = tab.describe_data(tab.BUILTIN, None, 100)
    assert "100 images in 10 classes" in summary and "80 to train" in summary
    assert sum(sum(bar.y) for bar in figure.data) == 100
    config = tab.training_config("Last k blocks", 3.0, 0, 2.0, 0, 16.0)
    assert (config.mode, config.last_k, config.resolution, config.lr) == ("last_k", 3, None, None)
    probe = tab.training_config("Linear probe (frozen backbone)", 2, 0, 1, 0, 16, 11.0)
    assert probe.mode == "linear" and probe.probe_block == 11
    assert tab.training_config("Full fine-tune", 2, 0, 1, 0, 16, 11).probe_block is None
    with pytest.raises(gr.Error, match="training settings"):
        tab.training_config("Full fine-tune", 2, 112, None, 0, 16)  # epochs field emptied
    with pytest.raises(gr.Error, match="patch tokens"):
        tab.fresh_model(None, 5000)  # 357 x 357 tokens: refused before any work


def datasets_png(value: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (value * 20, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_two_processes_share_the_work(tmp_path):
    """The CLI under a 2-process launcher (gloo on CPU): each process trains half the batches,
    and the main process alone saves a checkpoint that loads."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    base = tmp_path / "base"
    save_base(tiny_vit(), base)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "-m", "explorer.finetune", "--fashion-mnist",
         "80", "--model", f"local:{base}", "--mode", "full", "--epochs", "1", "--batch-size",
         "16", "--out", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "step 2/2" in done.stdout  # 64 training images / (2 processes x 16) = 2 steps
    assert done.stdout.count("done: val_acc") == 1  # only the main process reports
    loaded, _ = load_vit(f"local:{tmp_path / 'out'}", device="cpu")
    assert loaded.num_classes == 10


def test_mixed_precision_only_on_gpu():
    from explorer.training import resolve_mixed_precision

    expected = ("no",) if not torch.cuda.is_available() else ("bf16", "fp16")
    assert resolve_mixed_precision("auto") in expected  # fp32 on CPU: bf16 is far slower
    assert resolve_mixed_precision("fp16") == "fp16"


@pytest.mark.slow
def test_tab_queues_training_one_at_a_time_while_other_events_serve(tmp_path, monkeypatch):
    """Through the HTTP API: a second training waits in the queue, the data view still
    answers meanwhile, and /finetune_cancel stops the running job between batches."""
    import time

    import gradio as gr
    from gradio_client import Client
    from gradio_client.utils import Status

    from explorer import session_context
    from explorer.models import DEFAULT_MODEL
    from explorer.ui import finetune_tab as tab
    from explorer.ui.common import TabContext

    monkeypatch.setattr(session_context, "finetuned_dir", lambda: tmp_path)  # keep them here
    with gr.Blocks() as demo:
        tab.build_finetune_tab(TabContext())
    demo.queue(default_concurrency_limit=1)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        first, second, viewer = (Client(demo.local_url, verbose=False) for _ in range(3))
        args = (tab.BUILTIN, None, 60, DEFAULT_MODEL, "Full fine-tune", 1, 28)
        running = first.submit(*args, 20, 0, 4, api_name="/finetune")  # ~240 steps
        deadline = time.monotonic() + 60
        while running.status().code not in (Status.PROGRESS, Status.ITERATING):
            assert not running.done() and time.monotonic() < deadline, running.status()
            time.sleep(0.2)
        waiting = second.submit(*args, 1, 0, 16, api_name="/finetune")
        summary, _ = viewer.predict(tab.BUILTIN, None, 60, api_name="/finetune_data")
        assert "60 images in 10 classes" in summary
        assert not running.done()
        assert waiting.status().code == Status.IN_QUEUE
        assert "Cancelling" in first.predict(api_name="/finetune_cancel")
        assert running.result()[0].startswith("**Cancelled.**")
        assert waiting.result()[0] == "**Done.**"
        assert len(list((tmp_path / "sessions").iterdir())) == 1  # only the finished job saved
    finally:
        demo.close()
