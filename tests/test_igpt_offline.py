"""The committed offline model (assets/igpt) and the checkpoint formats around it."""

import json

import pytest
import torch
from PIL import Image

from explorer.igpt.checkpoint import (
    ASSET_DIR,
    OFFLINE_NAME,
    ModelUnavailableError,
    export_pretrained,
    load_igpt,
    load_local,
)
from explorer.igpt.data import load_fashion_mnist
from explorer.igpt.model import IGPTConfig, ImageGPT
from explorer.igpt.palette import grey_palette
from explorer.igpt.pipeline import image_tokens, stream_completions, surprise
from explorer.igpt.sampler import SampleConfig


def test_a_room_completing_the_same_example_gets_it_from_memory():
    """Seeded completions are kept: the same example, settings and seed are served in one
    step with the same picture; another seed, or none (fresh randomness), is computed."""
    import numpy as np

    from explorer.ui import igpt_tab

    example = igpt_tab.fashion_mnist_examples()[0]
    igpt_tab.COMPLETIONS.clear()

    def run(seed):
        steps = list(igpt_tab.complete(example, OFFLINE_NAME, 25, 2, 1.0, 0, 1.0, seed))
        return len(steps), np.asarray(steps[-1][0]), steps[-1][1]

    first = run(0)
    again = run(0)
    assert first[0] == 3 and again[0] == 1  # 3 rows streamed, then one finished picture
    assert np.array_equal(first[1], again[1]) and again[2].endswith("(kept)")
    assert run(1)[0] == 3  # another seed: computed
    assert run(None)[0] == 3 and run(None)[0] == 3  # no seed: never kept
    assert len(igpt_tab.COMPLETIONS) == 2


def test_offline_model_completes_a_test_image():
    m = load_igpt(OFFLINE_NAME)
    assert (m.height, m.width, m.palette.size) == (28, 28, 8)
    assert m.model.num_params() < 5_000_000
    assert (ASSET_DIR / "model.safetensors").stat().st_size < 20e6
    images, _ = load_fashion_mnist("test")
    pil = Image.fromarray(images[0].numpy(), "L")
    small, tokens = image_tokens(pil, m)
    assert torch.equal(torch.from_numpy(small[..., 0].copy()), images[0])  # 28×28 is untouched
    steps = list(stream_completions(m, tokens, 14, 2, SampleConfig(seed=0)))
    assert [filled for filled, _ in steps] == [28 * r for r in range(15, 29)]  # row by row
    samples = steps[-1][1]
    assert samples.shape == (2, 28, 28)
    assert torch.equal(samples[:, :14], tokens[:14].expand(2, 14, 28))  # kept rows unchanged
    assert 0 <= int(samples.min()) and int(samples.max()) < 8
    # a trained model is far better than 3 bits (8 greys picked blindly) on held-out images
    assert surprise(m, tokens).bits_per_dim < 1.5


def test_shipped_files_agree_with_each_other():
    """config.json, train_config.json and the training log describe the same run."""
    config = json.loads((ASSET_DIR / "config.json").read_text())
    recipe = json.loads((ASSET_DIR / "train_config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["n_head"]) == (
        recipe["n_layer"], recipe["n_embd"], recipe["n_head"])
    assert config["vocab_size"] == recipe["levels"] + 1  # the greys + the start token
    log = [json.loads(line) for line in (ASSET_DIR / "train_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log]
    assert steps == sorted(steps) and steps[-1] == recipe["step"]
    assert log[-1]["final"] and log[-1]["eval_bpd"] <= 0.60  # the target (1,000 images)


def test_export_round_trip_and_transformers_can_read_it(tmp_path):
    from transformers import ImageGPTForCausalImageModeling, ImageGPTImageProcessor

    torch.manual_seed(0)
    model = ImageGPT(IGPTConfig(vocab_size=5, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    export_pretrained(model.eval(), grey_palette(4), tmp_path, size=(4, 4))
    loaded = load_local(tmp_path)
    idx = torch.randint(0, 5, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(idx), model(idx))
        hf = ImageGPTForCausalImageModeling.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-5, rtol=1e-5)
    proc = ImageGPTImageProcessor.from_pretrained(tmp_path)
    grey = torch.tensor([0, 85, 170, 255], dtype=torch.uint8).view(1, 4, 1).expand(4, 4, 3)
    ids = proc(images=grey.numpy(), return_tensors="pt", input_data_format="channels_last")
    assert ids["input_ids"][0].tolist() == [0, 1, 2, 3] * 4  # same greys, same tokens
    assert json.loads((tmp_path / "palette.json").read_text())["name"] == "4 grey levels"


def test_unavailable_models_raise_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ModelUnavailableError, match="not an iGPT checkpoint"):
        load_local(tmp_path)
    with pytest.raises(ModelUnavailableError, match="not in the catalogue"):
        load_igpt("no-such-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(ModelUnavailableError, match="cannot be reached"):
        load_igpt("openai/imagegpt-medium")
