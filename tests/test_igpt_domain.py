"""What the iGPT tab says its model knows (`explorer.igpt.domain`), read from the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from explorer.igpt.checkpoint import OFFLINE_NAME, LoadedIGPT, load_igpt
from explorer.igpt.domain import (
    OPENAI_DATA,
    TRAINER_DATA,
    domain_note,
    model_domain,
    model_view,
    training_data,
)
from explorer.igpt.model import IGPTConfig, ImageGPT
from explorer.igpt.palette import cluster_palette


@pytest.fixture(scope="module")
def offline():
    return load_igpt(OFFLINE_NAME)


def test_the_offline_model_s_domain_comes_from_the_model(offline):
    d = model_domain(offline)
    assert (d.height, d.width) == (offline.height, offline.width) == (28, 28)
    assert d.grey and d.colours == offline.palette.size == 8
    assert d.levels == (0, 36, 73, 109, 146, 182, 219, 255)  # the 9-bit palette's greys
    assert d.trained_on == TRAINER_DATA and "Fashion-MNIST only" in d.trained_on
    note = domain_note(d)
    assert "28×28 pixels (784 tokens)" in note and "**8 grey levels**" in note
    assert "never sees colour" in note


def test_another_model_s_domain_follows_its_size_and_palette(tmp_path):
    palette = cluster_palette(torch.tensor([[-1.0, 0.0, 1.0], [1.0, -1.0, 0.0], [0.0, 0.0, 0.0]]),
                              "3 colours")
    model = ImageGPT(IGPTConfig(vocab_size=4, n_positions=12 * 8, n_embd=8, n_layer=1, n_head=1))
    m = LoadedIGPT("openai/imagegpt-tiny", model, palette, 12, 8)
    d = model_domain(m)
    assert (d.height, d.width, d.colours, d.grey, d.levels) == (12, 8, 3, False, ())
    assert d.trained_on == OPENAI_DATA
    assert "12×8 pixels (96 tokens), **3 colours**" in domain_note(d)
    assert training_data(tmp_path, "somewhere") == ""  # no record: said as unknown
    (tmp_path / "train_config.json").write_text("{}")
    assert training_data(tmp_path) == TRAINER_DATA


def test_an_upload_is_shown_as_the_model_reads_it(offline):
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (120, 90, 3), np.uint8))
    seen = np.asarray(model_view(photo, offline, target=224))
    scale = 224 // 28
    assert seen.shape == (28 * scale, 28 * scale, 3)
    greys = {tuple(p) for p in seen.reshape(-1, 3)}
    assert all(r == g == b for r, g, b in greys) and len(greys) <= 8  # the model's 8 greys
    assert {g[0] for g in greys} <= set(model_domain(offline).levels)
    # each model pixel is one flat square of scale x scale screen pixels
    assert (seen[:scale, :scale] == seen[0, 0]).all()

