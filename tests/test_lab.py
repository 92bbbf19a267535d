"""The inductive-bias & scale lab: models, deterministic runs, the translation test's
hand-derived cases, relative-bias attention through the capture, the shipped grid."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import torch

from explorer import datasets
from explorer.attention import capture
from explorer.lab import analysis, grid
from explorer.lab.checkpoint import load_shipped, save_vit
from explorer.lab.engine import Budget, LabRun, augment, run_lab, train
from explorer.lab.models import DEFAULT_SIZES, LAB_ARCHS, RelPosAttention, build, param_count, relative_table

needs_fmnist = pytest.mark.skipif(not datasets.FASHION_MNIST_DIR.is_dir(),
                                  reason="dataset-fashion-mnist")


@pytest.mark.parametrize("arch", LAB_ARCHS)
def test_models_are_comparable_and_classify_28px(arch):
    model = build(arch, seed=0).eval()
    assert 120_000 < param_count(model) < 260_000  # "comparable parameter count"
    assert model(torch.zeros(2, 3, 28, 28)).shape == (2, 10)


def test_seeded_build_is_identical():
    a, b = build("vit_rel", seed=3), build("vit_rel", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(),
                                                  b.state_dict().values(), strict=True))


def test_augment_shifts_within_two_pixels_and_flips():
    img = torch.zeros(1, 28, 28, dtype=torch.uint8)
    img[0, 10, 5] = 255
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        (y, x), = torch.nonzero(augment(img, g)[0]).tolist()
        seen.add((y, x))
        assert 8 <= y <= 12 and (3 <= x <= 7 or 20 <= x <= 24)  # 27 - 5 = 22 when flipped
    assert len(seen) > 10


@needs_fmnist
def test_runs_are_deterministic():
    budget = Budget(steps=6, batch=16, evals=2, test_images=200)
    first = train(LabRun("vit_rel", 100, seed=1), budget)
    second = train(LabRun("vit_rel", 100, seed=1), budget)
    assert first.test_acc == second.test_acc and first.curve == second.curve
    for p, q in zip(first.model.state_dict().values(), second.model.state_dict().values(),
                    strict=True):
        assert torch.equal(p, q)
    other = train(LabRun("vit_rel", 100, seed=2), budget)
    assert not torch.equal(first.model.head.weight, other.model.head.weight)


@needs_fmnist
def test_run_streams_steps_and_records_a_grid_row():
    events = list(run_lab(LabRun("cnn", 50, 0), Budget(steps=4, batch=8, evals=2,
                                                          test_images=100), log_every=1))
    assert [e.step for e in events[:4]] == [1, 2, 3, 4]
    row = events[-1].result.row()
    assert set(grid.COLUMNS) <= set(row) and row["train_images"] == 50 and row["steps"] == 4
    assert (row["width"], row["depth"]) == DEFAULT_SIZES["cnn"]
    assert row["flops"] > 0 and 0 <= row["test_acc"] <= 1


def _zero_qk(model):
    """Content off: every block's queries and keys are zero, only the bias is left."""
    with torch.no_grad():
        for blk in model.blocks:
            dim = blk.attn.qkv.in_features
            blk.attn.qkv.weight[: 2 * dim] = 0
            blk.attn.qkv.bias[: 2 * dim] = 0
            if isinstance(blk.attn, RelPosAttention):
                blk.attn.rel_pos.relative_position_bias_table.normal_(0, 2)
    return model.eval()


def test_relative_bias_without_content_is_shift_equivariant_away_from_borders():
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 28, 28)
    rel = _zero_qk(build("vit_rel", seed=0))
    dist = analysis.attention_shift_distance(rel, pixels, shift=1)
    assert dist.shape == (4,) and dist.abs().max() < 1e-5
    # the same logits from the absolute model, whose q and k carry position: not equivariant
    absolute = build("vit", seed=0).eval()
    with torch.no_grad():
        absolute.pos_embed.normal_(0, 1)
    flat = torch.zeros(3, 3, 28, 28)  # no content at all: only positions differ
    assert analysis.attention_shift_distance(absolute, flat, shift=1)[0] > 0.01
    # and with content but q=k=0 the relative maps are softmax(w) itself: equal at every query
    assert analysis.attention_shift_distance(rel, flat, shift=1).abs().max() < 1e-5


def test_relative_table_reads_like_the_grid_around_the_query():
    model = build("vit_rel", seed=0).eval()
    _zero_qk(model)
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.rel_pos.relative_position_bias_table.zero_()
    # put a large bias on "the key one patch to the right of its query" for head 0
    q_idx = 1 + 3 * 7 + 3  # patch (3, 3)
    index = attn.rel_pos.relative_position_index.view(50, 50)
    with torch.no_grad():
        attn.rel_pos.relative_position_bias_table[index[q_idx, q_idx + 1], 0] = 20.0
    maps = capture(model, torch.randn(1, 3, 28, 28))
    probs = maps.probs(0)[0, 0, q_idx]
    assert probs.argmax() == q_idx + 1 and probs.max() > 0.99  # the bias reached the maps
    table = relative_table(attn)  # (heads, 13, 13), centre (6, 6) = the query itself
    assert table.shape == (4, 13, 13)
    assert table[0, 6, 7] == 20.0 and table[0].abs().sum() == 20.0


def test_capture_adds_the_relative_bias_to_the_logits():
    torch.manual_seed(0)
    model = build("vit_rel", seed=0).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.rel_pos.relative_position_bias_table.normal_()
    x = torch.randn(2, 3, 28, 28)
    maps = capture(model, x)
    attn = model.blocks[0].attn
    h = model.blocks[0].norm1(model.norm_pre(model._pos_embed(model.patch_embed(x))))
    q, k, _ = attn.qkv(h).reshape(2, 50, 3, 4, 16).permute(2, 0, 3, 1, 4).unbind(0)
    expected = ((q * attn.scale) @ k.transpose(-2, -1) + attn.logit_bias()).softmax(-1)
    torch.testing.assert_close(maps.probs(0), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(maps.rows(0, [5, 9]), expected[:, :, [5, 9]], atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # and the model's own output is the one computed with that bias
        assert torch.allclose(model(x), maps.logits, atol=1e-5)


def test_cnn_features_shift_exactly_with_the_input_by_its_stride():
    torch.manual_seed(0)
    cnn = build("cnn", seed=0).eval()
    x = torch.randn(2, 3, 64, 64)  # fully convolutional: a bigger input has an interior
    errors = analysis.feature_shift_error(cnn, x, shift_px=4, margin_px=16)
    assert errors.shape == (6,) and errors.max() < 1e-5
    vit = build("vit", seed=0).eval()
    with torch.no_grad():
        vit.pos_embed.normal_(0, 1)
    assert analysis.feature_shift_error(vit, torch.randn(2, 3, 28, 28), 4, 4).min() > 0.1


def test_shift_images_moves_content_and_fills_the_edge():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    out = analysis.shift_images(x, 1, 2, fill=-1)
    assert out[0, 0, 1, 2] == x[0, 0, 0, 0] and out[0, 0, 3, 3] == x[0, 0, 2, 1]
    assert (out[0, 0, 0] == -1).all() and (out[0, 0, :, :2] == -1).all()


def test_interior_keeps_positions_whose_shift_stays_off_the_border():
    keep = analysis.interior((7, 7), 1, 1, margin=1)
    rows, cols = keep // 7, keep % 7
    assert rows.min() == 1 and rows.max() == 4 and cols.min() == 1 and cols.max() == 4
    assert len(keep) == 16


def test_saved_lab_vit_opens_in_the_other_tabs_with_identical_logits():
    from explorer.models import load_vit
    for arch in ("vit", "vit_rel"):
        model = build(arch, seed=0).eval()
        with tempfile.TemporaryDirectory() as tmp:
            out = save_vit(model, LabRun(arch, 500), f"{tmp}/m", {"note": "test"})
            loaded, config = load_vit(f"local:{out}", device="cpu")
            x = torch.randn(2, 3, 28, 28)
            assert torch.equal(model(x), loaded(x))
            assert config["input_size"] == (3, 28, 28)
            assert loaded.class_names[0] == datasets.FASHION_MNIST_CLASSES[0]


def test_error_vs_data_aggregates_seeds_and_finds_winners():
    rows = [dict(arch="cnn", width=24, depth=2, train_images=500, seed=s, test_acc=a)
            for s, a in ((0, 0.8), (1, 0.9))]
    rows += [dict(arch="vit", width=64, depth=4, train_images=500, seed=0, test_acc=0.7),
             dict(arch="vit", width=64, depth=4, train_images=5000, seed=0, test_acc=0.9),
             dict(arch="vit", width=32, depth=4, train_images=500, seed=0, test_acc=0.99)]
    curves = analysis.error_vs_data(rows)
    (cnn,) = curves["cnn"]
    assert cnn.mean == pytest.approx(0.15) and cnn.low == pytest.approx(0.1)
    assert cnn.high == pytest.approx(0.2) and cnn.seeds == 2
    assert [p.train_images for p in curves["vit"]] == [500, 5000]  # the w32 sweep run is not
    assert analysis.winners(curves) == {500: "cnn", 5000: "vit"}


def test_best_per_budget_picks_the_lowest_error_reached_within_it():
    small = analysis.ComputeCurve(32, 1, 1000, [1.0, 2.0, 4.0], [0.5, 0.3, 0.25])
    big = analysis.ComputeCurve(64, 2, 1000, [2.0, 4.0, 8.0], [0.6, 0.2, 0.1])
    assert analysis.best_per_budget([small, big], np.array([0.5, 1, 3, 4, 10])) == \
        [None, 32, 32, 64, 64]


# ---------------------------------------------------------------------------------------
# The shipped grid
# ---------------------------------------------------------------------------------------

shipped = pytest.mark.skipif(not grid.GRID_CSV.is_file(), reason="no shipped grid")


@shipped
def test_shipped_grid_covers_the_issue():
    rows = grid.read_grid()
    names = [grid.run_name(r) for r in rows]
    assert len(names) == len(set(names))
    main = [r for r in rows if analysis.is_default_size(r)]
    assert {r["arch"] for r in main} == set(LAB_ARCHS)
    assert {r["train_images"] for r in main} == set(grid.DATA_SIZES)
    assert {r["seed"] for r in main} == set(grid.SEEDS)
    assert len(main) == len(LAB_ARCHS) * len(grid.DATA_SIZES) * len(grid.SEEDS)
    sweep = [r for r in rows if r["arch"] == "vit" and r["seed"] == 0]
    assert {(r["width"], r["train_images"]) for r in sweep} >= {
        (w, n) for w in grid.SWEEP_WIDTHS for n in grid.SWEEP_SIZES}
    assert all(r["steps"] == Budget().steps and 0.1 < r["test_acc"] <= 1 for r in rows)


@shipped
def test_every_lab_figure_renders_from_the_shipped_grid():
    from explorer.plots import lab as plots
    rows = grid.read_grid()
    fig = plots.error_vs_data_figure(analysis.error_vs_data(rows),
                                     {"arch": "vit", "train_images": 500, "error": 0.3})
    assert {t.name for t in fig.data if t.showlegend is not False} >= {
        "CNN", "ViT (absolute positions)", "ViT + relative bias", "CoAtNet (mini)"}
    assert fig.data[-1].marker.symbol == "star"
    compute = plots.compute_figure(analysis.compute_curves(rows))
    assert len({t.name for t in compute.data}) >= len(grid.SWEEP_WIDTHS) + 1
    rel = load_shipped("vit_rel", 60000)
    bias = plots.relative_bias_figure(analysis.relative_tables(rel))
    assert len(bias.data) == 4 * 4 and bias.data[0].z.shape == (13, 13)
    x = torch.randn(4, 3, 28, 28)
    table = analysis.shift_equivariance_table(
        {a: load_shipped(a, 60000) for a in ("cnn", "vit", "vit_rel")}, x)
    assert set(table["vit"]) == {"attention", "features"} and "attention" not in table["cnn"]
    assert len(plots.shift_figure(table, 4).data) == 5
