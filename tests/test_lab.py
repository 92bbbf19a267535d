"""The inductive-bias & scale lab: models, deterministic runs, the translation test's
hand-derived cases, relative-bias attention through the capture, the shipped grid."""

from __future__ import annotations

import csv
import tempfile
from dataclasses import replace

import numpy as np
import pytest
import torch

from explorer import datasets
from explorer.attention import capture
from explorer.lab import analysis, engine, grid, paths
from explorer.lab.checkpoint import load_shipped, save_vit
from explorer.lab.engine import (
    Budget,
    Hyper,
    LabRun,
    augment,
    batch_indices,
    run_lab,
    run_steps,
    train,
)
from explorer.lab.models import DEFAULT_SIZES, LAB_ARCHS, RelPosAttention, build, param_count, relative_table
from explorer.lab.scramble import make_scramble, permute_vit, scramble_images, unscramble_images
from tests.test_training import fresh_accelerate_state  # noqa: F401  (a fixture)

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


TINY = Budget(min_steps=6, epochs=1, batch=16, evals=2, test_images=200)


def test_budget_rule_is_epochs_with_a_step_floor():
    b = Budget()  # 30 epochs of the 90% fit split, at least 3,000 steps of 128
    assert b.val_images(500) == 50 and b.val_images(60000) == 2000
    assert b.steps(500) == 3000  # 30 epochs of 450 would be 106 steps: the floor
    assert b.steps(60000) == -(-30 * 58000 // 128) == 13594
    assert b.steps(60000, scale=0.5) == 6797
    assert "30 epochs" in b.sentence() and "3,000" in b.sentence()


def test_batches_are_a_function_of_the_step_and_cover_each_epoch():
    n, batch = 100, 32  # 3 batches per epoch, the last 4 images wait for the next shuffle
    epoch0 = torch.cat([batch_indices(s, n, batch, seed=1) for s in range(3)])
    assert len(set(epoch0.tolist())) == 96
    assert torch.equal(batch_indices(4, n, batch, 1), batch_indices(4, n, batch, 1))
    assert not torch.equal(batch_indices(0, n, batch, 1), batch_indices(3, n, batch, 1))


@needs_fmnist
def test_runs_are_deterministic():
    first = train(LabRun("vit_rel", 100, seed=1), TINY)
    second = train(LabRun("vit_rel", 100, seed=1), TINY)
    assert first.test_acc == second.test_acc and first.curve == second.curve
    for p, q in zip(first.model.state_dict().values(), second.model.state_dict().values(),
                    strict=True):
        assert torch.equal(p, q)
    other = train(LabRun("vit_rel", 100, seed=2), TINY)
    assert not torch.equal(first.model.head.weight, other.model.head.weight)


@needs_fmnist
def test_a_run_resumed_from_its_checkpoint_ends_with_the_same_weights(tmp_path):
    run = LabRun("vit", 100, seed=3)
    budget = Budget(min_steps=12, epochs=1, batch=16, evals=3, test_images=100,
                    checkpoint_every_s=1e9)
    whole = train(run, budget)
    ckpt = tmp_path / "run.pt"
    cancel = __import__("threading").Event()
    for event in run_lab(run, budget, cancel=cancel, checkpoint=ckpt, log_every=1):
        if event.step == 5:
            cancel.set()  # the session stops mid-run: the loop saves on cancel
    assert ckpt.is_file() and torch.load(ckpt, weights_only=False)["step"] == 5
    resumed = train(run, budget, checkpoint=ckpt)
    assert not ckpt.exists()  # a finished run removes its checkpoint
    assert resumed.curve == whole.curve and resumed.test_acc == whole.test_acc
    for p, q in zip(whole.model.state_dict().values(), resumed.model.state_dict().values(),
                    strict=True):
        assert torch.equal(p, q)
    assert list(run_lab(run, budget, cancel=cancel, checkpoint=ckpt)) == []  # saved at step 0
    with pytest.raises(ValueError, match="another run"):
        list(run_lab(LabRun("vit", 100, seed=4), budget, checkpoint=ckpt))
    with pytest.raises(ValueError, match="another run"):  # same run, other hyperparameters
        list(run_lab(run, budget, Hyper(lr=5e-3), checkpoint=ckpt))


@needs_fmnist
def test_run_streams_steps_and_records_a_grid_row():
    events = list(run_lab(LabRun("cnn", 50, 0), Budget(min_steps=4, epochs=0.5, batch=8,
                                                          evals=2, test_images=100),
                          Hyper(lr=2e-3, shift=0, flip=False), log_every=1))
    assert [e.step for e in events[:4]] == [1, 2, 3, 4]
    row = events[-1].result.row()
    assert set(grid.COLUMNS) == set(row) and row["train_images"] == 50 and row["steps"] == 4
    assert (row["fit_images"], row["val_images"]) == (40, 10)  # 10% validates, at least 10
    assert row["epochs"] == 4 * 8 / 40 and row["lr"] == 2e-3 and row["shift"] == 0
    assert (row["width"], row["depth"]) == DEFAULT_SIZES["cnn"] and row["variant"] == "original"
    assert [s for s, _, _ in row["curve"]] == [2, 4] and row["val_acc"] == row["curve"][-1][1]
    assert row["flops"] > 0 and 0 <= row["test_acc"] <= 1


# ---------------------------------------------------------------------------------------
# The wrong-bias experiment: scrambled Fashion-MNIST
# ---------------------------------------------------------------------------------------


def test_scramble_moves_whole_patches_and_the_same_pixels_inside_each():
    s = make_scramble(28, 4, seed=0)
    index = torch.arange(28 * 28).reshape(28, 28)  # each pixel holds its own position
    out = scramble_images(index, s)
    for q in (0, 17, 48):
        src = int(s.positions[q])
        for j in (0, 5, 15):
            (r, c), (pr, pc) = divmod(q, 7), divmod(j, 4)
            (sr, sc), (ir, ic) = divmod(src, 7), divmod(int(s.pixels[j]), 4)
            assert out[4 * r + pr, 4 * c + pc] == index[4 * sr + ir, 4 * sc + ic]
    assert sorted(out.flatten().tolist()) == list(range(784))  # a bijection
    assert torch.equal(unscramble_images(out, s), index)
    assert not torch.equal(out, index)


@needs_fmnist
def test_scrambled_batches_are_the_original_batches_augmented_then_scrambled():
    from explorer.lab.engine import run_data, scramble, train_batch
    budget, hyper = Budget(batch=16), Hyper(shift=2, flip=True)
    fit_x, fit_y, _, _ = run_data(LabRun("cnn", 200, 0), budget)
    for step in (0, 9):
        x, y = train_batch(step, fit_x, fit_y, LabRun("cnn", 200, 0), budget, hyper)
        xs, ys = train_batch(step, fit_x, fit_y, LabRun("cnn", 200, 0, variant="scrambled"),
                             budget, hyper)
        assert torch.equal(y, ys) and torch.equal(xs, scramble_images(x, scramble()))
        assert not torch.equal(xs, x)


def test_a_vit_with_absolute_positions_is_indifferent_to_the_scramble():
    torch.manual_seed(0)
    model = build("vit", seed=0).eval()
    with torch.no_grad():
        model.pos_embed.normal_(0, 1)  # trained-like positions, not the near-zero init
    s = make_scramble(28, 4, seed=5)
    x = torch.randn(4, 3, 28, 28)
    permuted = permute_vit(model, s)
    assert torch.allclose(permuted(scramble_images(x, s)), model(x), atol=1e-5)
    assert (model(scramble_images(x, s)) - model(x)).abs().max() > 0.05  # unpermuted: not
    with pytest.raises(ValueError, match="no absolute position"):
        permute_vit(build("vit_rel", seed=0), s)


@needs_fmnist
def test_a_vits_scrambled_run_is_its_original_run_from_a_permuted_initialisation():
    """What the tab's scrambled sentence reads the ViT's change as: chance. Trained on the
    scrambled batches from the permuted initialisation, the ViT follows its original run step
    for step (AdamW acts on each weight alone, so the permutation carries through every
    update); its seed's own initialisation is just another draw of the same distribution."""
    import torch.nn.functional as F

    from explorer.lab.engine import model_input, run_data, scramble, train_batch
    run, budget, hyper = LabRun("vit", 200, 0), Budget(batch=16), Hyper(lr=4e-3, shift=2)
    fit_x, fit_y, val_x, _ = run_data(run, budget)
    model = build("vit", seed=0)
    twin = permute_vit(model, scramble())
    opts = [torch.optim.AdamW(m.parameters(), lr=hyper.lr, weight_decay=0.05)
            for m in (model, twin)]
    for step in range(6):
        losses = []
        for m, opt, variant in zip((model, twin), opts, ("original", "scrambled"),
                                   strict=True):
            x, y = train_batch(step, fit_x, fit_y, replace(run, variant=variant), budget, hyper)
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    model.eval()
    twin.eval()
    # to AdamW's rounding drift: a rounding difference in a near-zero gradient can turn into
    # a step of up to the learning rate (4e-3); the unpermuted weights differ by ~0.03–0.1
    with torch.no_grad():
        assert torch.allclose(twin(model_input(val_x[:8], "scrambled")),
                              model(model_input(val_x[:8])), atol=5e-3)
        for (name, p), q in zip(permute_vit(model, scramble()).named_parameters(),
                                twin.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=0, atol=5e-3, msg=name)


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


def _row(arch, n, acc, seed=0, width=None, variant="original", budget=1.0, **kw):
    width = width or DEFAULT_SIZES[arch][0]
    return dict(arch=arch, width=width, depth=DEFAULT_SIZES[arch][1], train_images=n, seed=seed,
                test_acc=acc, variant=variant, budget=budget, **kw)


def test_error_vs_data_aggregates_seeds_and_finds_winners():
    rows = [_row("cnn", 500, a, seed=s) for s, a in ((0, 0.8), (1, 0.9))]
    rows += [_row("vit", 500, 0.7), _row("vit", 5000, 0.9), _row("vit", 500, 0.99, width=32),
             _row("vit", 500, 0.98, budget=0.5), _row("vit", 500, 0.1, variant="scrambled")]
    curves = analysis.error_vs_data(rows)
    (cnn,) = curves["cnn"]
    assert cnn.mean == pytest.approx(0.15) and cnn.low == pytest.approx(0.1)
    assert cnn.high == pytest.approx(0.2) and cnn.seeds == 2
    # the w32 and half-budget sweep runs and the scrambled run are not the grid's
    assert [p.train_images for p in curves["vit"]] == [500, 5000]
    assert curves["vit"][0].mean == pytest.approx(0.3)
    assert analysis.winners(curves) == {500: "cnn"}  # the ViT alone at 5,000 wins nothing
    (scrambled,) = analysis.error_vs_data(rows, "scrambled")["vit"]
    assert scrambled.mean == pytest.approx(0.9)


def test_the_grid_in_words_is_computed_from_its_rows():
    rows = [_row("cnn", n, a) for n, a in ((500, 0.85), (3000, 0.88), (60000, 0.91))]
    rows += [_row("vit", n, a) for n, a in ((500, 0.70), (3000, 0.85), (60000, 0.915))]
    rows += [_row("coatnet", 500, 0.80)]
    curves = analysis.error_vs_data(rows)
    assert analysis.winners_sentence(curves) == (
        "Lowest test error: **CNN** at 500–3,000 images, **ViT (absolute positions)** at "
        "60,000 images (not finished yet: CoAtNet (mini) at 3,000, 60,000 images).")
    # a size where one architecture alone has finished has no winner
    alone = analysis.error_vs_data(rows + [_row("vit", 20000, 0.9)])
    assert 20000 not in analysis.winners(alone)
    assert analysis.winners_sentence(alone) == analysis.winners_sentence(curves)
    assert analysis.gap_sentence(curves) == (
        "The ViT (absolute positions) is 15.0 points behind the CNN at 500 images and 0.5 "
        "points ahead of it at 60,000: the ViT (absolute positions) overtakes it at 60,000 "
        "images.")
    # the order changes more than once (the shipped CoAtNet against the ViT): gaps in
    # error, CoAtNet − ViT, +1.3, −0.4, −1.5, +0.1, −0.2 points; from 1,200 images on, the
    # largest is 1.5. Naming only the first crossing would say it overtook for good
    traded = analysis.error_vs_data(
        [_row("vit", n, a) for n, a in ((500, 0.790), (1200, 0.822), (3000, 0.855),
                                        (7500, 0.889), (20000, 0.908))]
        + [_row("coatnet", n, a) for n, a in ((500, 0.777), (1200, 0.826), (3000, 0.870),
                                              (7500, 0.888), (20000, 0.910))])
    assert analysis.gap_sentence(traded, "coatnet", "vit") == (
        "The CoAtNet (mini) is 1.3 points behind the ViT (absolute positions) at 500 images "
        "and 0.2 points ahead of it at 20,000, but the lead changes hands 3 times on the way. "
        "From 1,200 images on the two stay within 1.5 points (the CoAtNet (mini) ahead at "
        "1,200, 3,000 and 20,000 images, behind at 7,500).")
    # ahead at first, then behind: one crossing the other way
    fell = analysis.error_vs_data([_row("cnn", 500, 0.80), _row("cnn", 9000, 0.95),
                                   _row("vit", 500, 0.81), _row("vit", 9000, 0.90)])
    assert analysis.gap_sentence(fell).endswith(
        "5.0 points behind it at 9,000: the ViT (absolute positions) falls behind it at 9,000 "
        "images.")
    steady = analysis.error_vs_data([_row("cnn", 500, 0.9), _row("cnn", 9000, 0.95),
                                     _row("vit", 500, 0.8), _row("vit", 9000, 0.845)])
    assert analysis.gap_sentence(steady).endswith("the gap stays about the same.")
    # the ends alone would hide a gap that widens before it narrows: error gaps ViT − CNN
    # 5.0 (500), 8.0 (3,000), 2.0 (60,000) points; and one that closes in the middle:
    # 5.0, 1.0, 5.5 (both by more than `SAME`, 1 point, beyond the nearer end)
    bump = analysis.error_vs_data(
        [_row("cnn", n, a) for n, a in ((500, 0.85), (3000, 0.88), (60000, 0.92))]
        + [_row("vit", n, a) for n, a in ((500, 0.80), (3000, 0.80), (60000, 0.90))])
    assert analysis.gap_sentence(bump).endswith(
        "the gap narrows with data (widest at 3,000 images: 8.0 points).")
    dip = analysis.error_vs_data(
        [_row("cnn", n, a) for n, a in ((500, 0.85), (3000, 0.88), (60000, 0.92))]
        + [_row("vit", n, a) for n, a in ((500, 0.80), (3000, 0.87), (60000, 0.865))])
    assert analysis.gap_sentence(dip).endswith(
        "the gap stays about the same (narrowest at 3,000 images: 1.0 points).")
    # within `SAME` of an end it is not named (the shipped ViT: 3.0, 3.8 at 1,200, … 1.4)
    near = analysis.error_vs_data(
        [_row("cnn", n, a) for n, a in ((500, 0.85), (3000, 0.88), (60000, 0.92))]
        + [_row("vit", n, a) for n, a in ((500, 0.80), (3000, 0.822), (60000, 0.90))])
    assert analysis.gap_sentence(near).endswith("the gap narrows with data.")
    rows += [_row("cnn", 500, 0.70, variant="scrambled"), _row("vit", 500, 0.703,
                                                                 variant="scrambled")]
    assert analysis.scramble_sentence(rows) == (
        "On scrambled images, test accuracy against the original images (mean over the sizes "
        "trained both ways: 500 images): the ViT (absolute positions) is unchanged (+0.3 "
        "points); the CNN loses 15.0 points. The ViT (absolute positions) cannot tell the two "
        "apart, so its 0.3-point change is what another initialisation gives: a change that "
        "small is chance, not bias.")
    assert analysis.scramble_sentence(rows[:-2]) == ""


def test_the_seed_sentence_gives_the_largest_and_median_spread_of_runs_with_two_seeds():
    # spreads in points: CNN 500 |80.0 − 81.0| = 1.0, ViT 500 |79.0 − 78.5| = 0.5, scrambled
    # CNN 500 |70.0 − 72.0| = 2.0 (median 1.0); the ViT on 3,000 (one seed) and a size-sweep
    # run (another width: not the architecture grid) count for nothing
    rows = [_row("cnn", 500, 0.80), _row("cnn", 500, 0.81, seed=1),
            _row("vit", 500, 0.79), _row("vit", 500, 0.785, seed=1),
            _row("cnn", 500, 0.70, variant="scrambled"),
            _row("cnn", 500, 0.72, seed=1, variant="scrambled"),
            _row("vit", 3000, 0.85), _row("vit", 20000, 0.70, width=32),
            _row("vit", 20000, 0.80, seed=1, width=32)]
    assert analysis.seed_sentence(rows) == (
        "Seeds: 3 runs of the grid have finished with a second seed; the seeds of a run "
        "land within 2.0 points of each other in test accuracy (median 1.0; the shaded bands): "
        "a difference between architectures smaller than that may be chance. Each seed also "
        "draws the training images, the same for every architecture, so the architectures "
        "compare within a seed: the lowest test error goes to the same architecture with every "
        "seed at 500 images.")
    assert analysis.seed_sentence(rows[:2]).startswith(
        "Seeds: 1 run of the grid has finished with a second seed; the seeds of a run "
        "land within 1.0 points")
    assert analysis.seed_sentence(rows[::2]) == ""


def test_the_seed_sentence_says_where_each_seed_alone_gives_the_same_winner():
    # 500 images: the CNN wins with seed 0 (80.0 > 79.0) and seed 1 (81.0 > 78.5): the same;
    # 3,000: the CNN with seed 0 (88.0 > 87.0), the ViT with seed 1 (88.5 > 87.5): differs;
    # 7,500: the ViT has one seed only: not compared; scrambled runs: not compared
    rows = [_row("cnn", 500, 0.80), _row("cnn", 500, 0.81, seed=1),
            _row("vit", 500, 0.79), _row("vit", 500, 0.785, seed=1),
            _row("cnn", 3000, 0.88), _row("cnn", 3000, 0.875, seed=1),
            _row("vit", 3000, 0.87), _row("vit", 3000, 0.885, seed=1),
            _row("cnn", 7500, 0.90), _row("cnn", 7500, 0.90, seed=1), _row("vit", 7500, 0.95),
            _row("cnn", 500, 0.70, variant="scrambled"),
            _row("cnn", 500, 0.72, seed=1, variant="scrambled"),
            _row("vit", 500, 0.75, variant="scrambled"),
            _row("vit", 500, 0.71, seed=1, variant="scrambled")]
    both = (" Each seed also draws the training images, the same for every architecture, so "
            "the architectures compare within a seed: the lowest test error goes to the same "
            "architecture with every seed")
    assert analysis.seed_sentence(rows).endswith(
        both + " at 500 images, but not at 3,000 images (the CNN with seed 0, the ViT "
        "(absolute positions) with seed 1): there the winner depends on the seed.")
    assert analysis.seed_sentence(rows[:4]).endswith(both + " at 500 images.")
    assert analysis.seed_sentence(rows[4:8]).endswith(
        both + " at none of the sizes with two seeds: not at 3,000 images (the CNN with seed "
        "0, the ViT (absolute positions) with seed 1): there the winner depends on the seed.")
    assert analysis.seed_sentence(rows[8:]).endswith("may be chance.")  # nothing to compare


def test_the_learning_rate_sweep_extends_upwards_while_the_best_is_at_its_edge():
    from explorer.lab import sweep

    def rows(arch, accs):
        return [dict(arch=arch, width=DEFAULT_SIZES[arch][0], depth=DEFAULT_SIZES[arch][1],
                     train_images=sweep.SWEEP_IMAGES, lr=lr, shift=2, flip=True, val_acc=a,
                     weight_decay=0.05, budget=sweep.SWEEP_BUDGET)
                for lr, a in zip(sweep.LRS, accs, strict=True)]

    base = len(sweep.lr_stage())
    rising = rows("cnn", (0.80, 0.82, 0.84, 0.86))  # best at the largest rate: try twice it
    interior = rows("vit", (0.60, 0.70, 0.72, 0.65))
    extra = sweep.lr_stage(rising + interior)[base:]
    assert [(run.arch, h.lr) for run, h in extra] == [("cnn", 2 * max(sweep.LRS))]
    assert sweep.lr_stage(rows("cnn", (0.80, 0.82, 0.84, 0.86))[:3]) == sweep.lr_stage()


def test_convergence_reads_the_last_fifth_of_the_validation_curve():
    curve = [(200, 0.50, 0.5), (400, 0.80, 0.8), (600, 0.850, 0.86), (800, 0.900, 0.92),
             (1000, 0.902, 0.95)]
    row = dict(steps=1000, curve=curve, train_acc=0.95, test_acc=0.89)
    check = analysis.convergence(row)  # 80% of 1,000 steps is the eval at 800
    assert check.late_gain == pytest.approx(0.002) and check.converged
    late = dict(row, curve=curve[:-1] + [(1000, 0.905, 0.95)])
    assert not analysis.convergence(late).converged  # +0.5 points in the last fifth
    overfit_test = dict(row, train_acc=0.88)
    assert not analysis.convergence(overfit_test).converged  # train below test


def test_convergence_fits_a_line_through_the_last_fifth_not_two_single_evaluations():
    # the evaluation at 80% sat 0.3 points low and the four after it are flat: two single
    # points say "+0.3, not converged"; Theil–Sen's slope is the median of the 10 pairwise
    # slopes (the 6 among the flat four are 0, the 4 from the low one 6e-5, 3e-5, 2e-5,
    # 1.5e-5): 0, so the line is flat on them and the run has converged
    curve = [(400, 0.80, 0.8), (600, 0.85, 0.9), (800, 0.897, 0.95), (850, 0.900, 0.95),
             (900, 0.900, 0.95), (950, 0.900, 0.95), (1000, 0.900, 0.95)]
    row = dict(steps=1000, curve=curve, train_acc=0.95, test_acc=0.89)
    check = analysis.convergence(row)
    assert check.late_gain == pytest.approx(0.0) and check.converged
    assert analysis.late_line(curve, 1000) == ((800, pytest.approx(0.9)),
                                              (1000, pytest.approx(0.9)))
    # a steady climb through the last fifth is not converged: 0.4 points
    climb = curve[:2] + [(800 + 50 * i, 0.896 + 0.001 * i, 0.95) for i in range(5)]
    assert analysis.convergence(dict(row, curve=climb)).late_gain == pytest.approx(0.004)
    assert not analysis.convergence(dict(row, curve=climb)).converged
    # one image's dip just after the cut on a flat 120-image curve (the CNN on 1,200 images,
    # 84.17% with one evaluation at 83.33%): least squares read +0.34 points; Theil–Sen 0
    flat = [(2400 + 75 * i, 0.8417, 1.0) for i in range(9)]
    flat[1] = (2475, 0.8333, 1.0)
    assert analysis.late_gain(flat, 3000) == pytest.approx(0.0)


def test_compute_curves_put_each_finished_budget_of_a_width_on_one_curve():
    rows = [_row("vit", 20000, acc, width=w, budget=b, flops=f, steps=s, batch=128, params=p)
            for w, f, p, runs in ((32, 10, 1, ((0.5, 100, 0.7), (1.0, 200, 0.8))),
                                  (64, 40, 4, ((0.5, 100, 0.75), (1.0, 200, 0.85))))
            for b, s, acc in runs]
    rows.append(_row("vit", 500, 0.6, flops=40, steps=50, batch=128, params=4))  # one width
    small, big = analysis.compute_curves(rows)
    assert (small.width, small.train_images) == (32, 20000)
    assert small.compute == [3 * 10 * 100 * 128, 3 * 10 * 200 * 128]
    assert small.error == pytest.approx([0.3, 0.2]) and big.error == pytest.approx([0.25, 0.15])


def test_best_per_budget_picks_the_lowest_error_reached_within_it():
    small = analysis.ComputeCurve(32, 1, 1000, [1.0, 2.0, 4.0], [0.5, 0.3, 0.25])
    big = analysis.ComputeCurve(64, 2, 1000, [2.0, 4.0, 8.0], [0.6, 0.2, 0.1])
    assert analysis.best_per_budget([small, big], np.array([0.5, 1, 3, 4, 10])) == \
        [None, 32, 32, 64, 64]


# ---------------------------------------------------------------------------------------
# The shipped grid
# ---------------------------------------------------------------------------------------

shipped = pytest.mark.skipif(not grid.GRID_CSV.is_file(), reason="no shipped grid")


def test_grid_plan_covers_the_issue():
    runs = grid.grid_runs()
    main = [r for r in runs if r.variant == "original" and r.budget == 1.0
            and (r.width, r.depth) == DEFAULT_SIZES[r.arch]]
    assert {(r.arch, r.train_images, r.seed) for r in main} == {
        (a, n, s) for a in LAB_ARCHS for n in grid.DATA_SIZES for s in grid.SEEDS}
    scrambled = {(r.arch, r.train_images, r.seed) for r in runs if r.variant == "scrambled"}
    assert scrambled == {(a, n, s) for a in LAB_ARCHS for n in grid.SCRAMBLED_SIZES
                         for s in grid.SEEDS} and len(grid.SCRAMBLED_SIZES) >= 3
    sizes = {(r.width, r.budget) for r in runs if r.arch == "vit" and r.train_images ==
             grid.SWEEP_SIZE and r.seed == 0 and r.variant == "original"}
    assert sizes == {(w, b) for w in grid.SWEEP_WIDTHS for b in grid.SWEEP_BUDGETS}
    assert len(grid.SWEEP_WIDTHS) >= 4 and len(grid.SWEEP_BUDGETS) >= 3
    assert len({r.name for r in runs}) == len(runs)
    # the relative model the tab's relative view loads, then the lecture's comparison,
    # smallest size first
    assert runs[0] == LabRun("vit_rel", grid.REL_VIEW_SIZE, 0)
    assert ("vit_rel", grid.REL_VIEW_SIZE) in grid.KEEP_MODELS
    assert [(r.arch, r.train_images) for r in runs[1:1 + 2 * len(grid.DATA_SIZES)]] == [
        (a, n) for n in grid.DATA_SIZES for a in ("cnn", "vit")]
    # every Lecture figure's seed-0 runs (steps 7, 8, 9) before any second seed
    first_seed1 = next(i for i, r in enumerate(runs) if r.seed == 1)
    lecture = [i for i, r in enumerate(runs) if r.seed == 0 and r.variant == "original"]
    assert max(lecture) < first_seed1
    # the second seeds smallest size first, both variants: the scrambled ones do not wait
    # behind the largest original runs
    assert [r.train_images for r in runs[first_seed1:]] == sorted(
        r.train_images for r in runs[first_seed1:])
    assert runs[first_seed1:first_seed1 + 8] == [
        LabRun(a, 500, 1, variant=v) for v in ("original", "scrambled") for a in LAB_ARCHS]


@shipped
def test_every_shipped_row_says_what_it_is_and_follows_the_rule():
    from explorer.lab import sweep
    rows, budget, chosen = grid.read_grid(), Budget(), sweep.read_choice()
    keys = [grid.row_key(r) for r in rows]
    assert len(keys) == len(set(keys)) and set(keys) <= {r.name for r in grid.grid_runs()}
    for r in rows:
        assert r["fit_images"] + r["val_images"] == r["train_images"]
        # the rule's steps at the row's floor (`Hyper.floor`: 2× for the ViTs), scaled by its
        # budget share and 2× per attempt: 500 images, floor 2, attempt 1 -> 4 × 3,000
        assert r["steps"] == budget.steps(r["train_images"], r["budget"] * 2 ** r["attempt"],
                                          r["floor"])
        assert r["epochs"] == pytest.approx(r["steps"] * r["batch"] / r["fit_images"], abs=0.01)
        if chosen:  # (none while the sweep runs again; `grid.supersede` then moves stale rows)
            h = chosen[r["arch"]]
            assert (r["lr"], r["weight_decay"], r["shift"], r["flip"], r["floor"]) == (
                h.lr, h.weight_decay, h.shift, h.flip, h.floor)
        # evaluated on the schedule of 20 evaluations (rows begun before 2026-12-01 22:00)
        # or of `budget.evals`, ending at the last step
        steps = [p[0] for p in r["curve"]]
        schedules = {round(r["steps"] * (i + 1) / n) for n in (20, budget.evals)
                     for i in range(n)}
        assert steps == sorted(set(steps)) and set(steps) <= schedules
        assert len(steps) >= 20 and steps[-1] == r["steps"]
        assert 0.1 < r["test_acc"] <= 1 and r["seconds"] > 0


def _sweep_row(arch, lr, aug, val, budget, images=None, floor=1.0):
    from explorer.lab import sweep
    return dict(arch=arch, width=DEFAULT_SIZES[arch][0], depth=DEFAULT_SIZES[arch][1],
                train_images=images or sweep.SWEEP_IMAGES, lr=lr, shift=2 if aug else 0,
                flip=aug, val_acc=val, weight_decay=0.05, budget=budget, floor=floor)


def test_augmentation_is_chosen_at_the_full_budget_at_the_first_stages_rate():
    from explorer.lab import sweep
    q, full, n = sweep.SWEEP_BUDGET, sweep.AUG_BUDGET, sweep.AUG_IMAGES
    rows = [_sweep_row("vit", lr, True, v, q) for lr, v in zip(sweep.LRS, (.6, .7, .71, .69),
                                                               strict=True)]
    rows.append(_sweep_row("vit", 4e-3, False, 0.75, q))  # quarter budget: chooses nothing
    stage = [(run.arch, run.train_images, run.budget, h.lr, h.shift, h.flip)
             for run, h in sweep.aug_stage(rows)]
    assert stage == [("vit", n, full, 4e-3, 2, True), ("vit", n, full, 4e-3, 0, False)]
    assert sweep.choose_aug(rows) == {}  # the augmentation stage has not run
    # the stage's first rows, on the first stage's 3,000 images (300 validating), choose nothing
    rows += [_sweep_row("vit", 4e-3, True, 0.78, full), _sweep_row("vit", 4e-3, False, 0.7833, full)]
    assert sweep.choose_aug(rows) == {}
    rows.append(_sweep_row("vit", 4e-3, False, 0.78, full, n))
    assert sweep.choose_aug(rows) == {}  # one of its two runs: no choice yet
    rows.append(_sweep_row("vit", 4e-3, True, 0.80, full, n))
    assert sweep.choose_aug(rows) == {"vit": Hyper(lr=4e-3, weight_decay=0.05, shift=2, flip=True)}
    rows[-1]["val_acc"] = 0.78  # a tie goes to augmentation, whichever run finished first
    assert sweep.choose_aug(rows)["vit"].flip and sweep.choose_aug(rows[::-1])["vit"].flip
    rows[-1]["val_acc"] = 0.77
    assert sweep.choose_aug(rows) == {"vit": Hyper(lr=4e-3, weight_decay=0.05, shift=0, flip=False)}


def test_the_augmentation_stage_validates_on_2000_of_its_5000_images():
    from explorer.lab import sweep
    run, rule = sweep.aug_run("vit"), sweep.phase_budget("sweep-aug")
    assert rule.val_images(run.train_images) == 2000  # ±0.9 points at 80%, not ±2.3 (300)
    assert run.train_images - rule.val_images(run.train_images) == 3000
    assert rule.steps(run.train_images, run.scale) == 3000  # the floor: 30 epochs are 704
    assert sweep.phase_budget("sweep-lr") == sweep.phase_budget("grid") == Budget()
    assert sweep.phase_budget("sweep-floor") == rule  # the floor stage: the same images


def test_the_floor_doubles_while_twice_the_steps_validate_a_point_better():
    from explorer.lab import sweep
    q, full, n = sweep.SWEEP_BUDGET, sweep.AUG_BUDGET, sweep.AUG_IMAGES
    rows = [_sweep_row("vit", 4e-3, True, 0.7, q), _sweep_row("vit", 4e-3, False, 0.8, full, n),
            _sweep_row("vit", 4e-3, True, 0.84, full, n)]
    assert sweep.choose_aug(rows) == {"vit": Hyper(lr=4e-3)}
    assert sweep.choose_floor(rows) == {}  # the floor stage has not run

    def stage(rows):
        done = {(r["shift"], r["floor"]) for r in rows if r["train_images"] == n}
        return [(run.train_images, run.budget, h.floor) for run, h in sweep.floor_stage(rows)
                if (h.shift, h.floor) not in done]

    assert stage(rows) == [(n, full, 2.0)]  # the chosen recipe at twice the floor's steps
    rule = sweep.phase_budget("sweep-floor")
    assert rule.steps(n, 1.0, 2.0) == 6000
    # doubled: 0.9 points better, under the 1-point bar: the floor stays, the stage is done
    rows.append(_sweep_row("vit", 4e-3, True, 0.849, full, n, floor=2.0))
    assert stage(rows) == [] and sweep.choose_floor(rows) == {"vit": Hyper(lr=4e-3, floor=1.0)}
    # 1 point better: the floor doubles, and the stage tries the next doubling
    rows[-1]["val_acc"] = 0.85
    assert sweep.choose_floor(rows) == {} and stage(rows) == [(n, full, 4.0)]
    rows.append(_sweep_row("vit", 4e-3, True, 0.855, full, n, floor=4.0))
    assert stage(rows) == [] and sweep.choose_floor(rows) == {"vit": Hyper(lr=4e-3, floor=2.0)}
    rows[-1]["val_acc"] = 0.87  # better again, but 4 is the largest floor tried
    assert stage(rows) == [] and sweep.choose_floor(rows) == {"vit": Hyper(lr=4e-3, floor=4.0)}
    assert sweep.MAX_FLOOR == 4.0


def test_the_weight_decay_moves_from_005_only_for_a_point_better_and_on_while_it_gains():
    from explorer.lab import sweep
    q, full, n = sweep.SWEEP_BUDGET, sweep.AUG_BUDGET, sweep.AUG_IMAGES
    rows = [_sweep_row("vit", 4e-3, True, 0.7, q), _sweep_row("vit", 4e-3, False, 0.8, full, n),
            _sweep_row("vit", 4e-3, True, 0.84, full, n),
            _sweep_row("vit", 4e-3, True, 0.86, full, n, floor=2.0),
            _sweep_row("vit", 4e-3, True, 0.865, full, n, floor=4.0)]
    assert sweep.choose_floor(rows) == {"vit": Hyper(lr=4e-3, floor=2.0)}
    assert sweep.choose_wd(rows) == {}  # the weight-decay stage has not run

    def stage(rows):
        done = {(r["weight_decay"], r["floor"]) for r in rows if r["train_images"] == n}
        return [(run.train_images, h.floor, h.weight_decay) for run, h in sweep.wd_stage(rows)
                if (h.weight_decay, h.floor) not in done]

    def wd_row(wd, val):
        return dict(_sweep_row("vit", 4e-3, True, val, full, n, floor=2.0), weight_decay=wd)

    # the chosen run (floor 2) at 0.05's two neighbours, a factor of 5 away
    assert stage(rows) == [(n, 2.0, 0.01), (n, 2.0, 0.25)]
    rows.append(wd_row(0.25, 0.869))
    assert sweep.choose_wd(rows) == {} and stage(rows) == [(n, 2.0, 0.01)]  # one of two: no choice
    rows.append(wd_row(0.01, 0.80))
    # 0.9 points better: under the bar, 0.05 stays and the stage is done
    assert stage(rows) == [] and sweep.choose_wd(rows) == {"vit": Hyper(lr=4e-3, floor=2.0)}
    # a point better: 0.25, and the walk goes on that way only (to 1.25, not back to 0.05)
    rows[-2]["val_acc"] = 0.87
    assert sweep.choose_wd(rows) == {} and stage(rows) == [(n, 2.0, 1.25)]
    rows.append(wd_row(1.25, 0.879))
    assert stage(rows) == [] and sweep.choose_wd(rows) == {
        "vit": Hyper(lr=4e-3, weight_decay=0.25, floor=2.0)}
    rows[-1]["val_acc"] = 0.88  # a point better again, and 1.25 is the largest value
    assert stage(rows) == [] and sweep.choose_wd(rows) == {
        "vit": Hyper(lr=4e-3, weight_decay=1.25, floor=2.0)}
    # both neighbours a point better: the better one; the smaller on a tie
    rows = rows[:5] + [wd_row(0.25, 0.88), wd_row(0.01, 0.885), wd_row(0.002, 0.88)]
    assert stage(rows) == [] and sweep.choose_wd(rows)["vit"].weight_decay == 0.01
    rows[-2]["val_acc"] = 0.88
    assert sweep.choose_wd(rows)["vit"].weight_decay == 0.01
    # the augmentation stage's choice ignores the weight-decay stage's floor-1 rows
    rows = [_sweep_row("cnn", 8e-3, True, 0.8, q), _sweep_row("cnn", 8e-3, False, 0.85, full, n),
            _sweep_row("cnn", 8e-3, True, 0.84, full, n),
            dict(_sweep_row("cnn", 8e-3, True, 0.9, full, n), weight_decay=0.25)]
    assert sweep.choose_aug(rows) == {"cnn": Hyper(lr=8e-3, shift=0, flip=False)}
    assert sweep.phase_budget("sweep-wd") == sweep.phase_budget("sweep-aug")


def test_the_learning_rate_is_walked_again_at_the_full_budget_after_the_weight_decay():
    from explorer.lab import sweep
    q, full, n = sweep.SWEEP_BUDGET, sweep.AUG_BUDGET, sweep.AUG_IMAGES

    def row(val, lr=4e-3, wd=0.05, floor=2.0):
        return dict(_sweep_row("vit", lr, True, val, full, n, floor=floor), weight_decay=wd)

    rows = [_sweep_row("vit", 4e-3, True, 0.7, q), _sweep_row("vit", 4e-3, False, 0.8, full, n),
            row(0.84, floor=1.0), row(0.86), row(0.865, floor=4.0),
            row(0.861, wd=0.01), row(0.87, wd=0.25), row(0.86, wd=1.25)]
    assert sweep.choose_wd(rows) == {"vit": Hyper(lr=4e-3, weight_decay=0.25, floor=2.0)}
    assert sweep.choose(rows) == {}
    # the chosen run (weight decay 0.25, floor 2) at half and twice the first stage's rate
    assert [(h.lr, h.weight_decay, h.floor) for _, h in sweep.lr_full_stage(rows)] == [
        (4e-3, 0.25, 2.0), (2e-3, 0.25, 2.0), (8e-3, 0.25, 2.0)]
    rows += [row(0.88, lr=2e-3, wd=0.25), row(0.85, lr=8e-3, wd=0.25)]
    assert [h.lr for _, h in sweep.lr_full_stage(rows)][-1] == 1e-3  # on down, a point better
    rows.append(row(0.885, lr=1e-3, wd=0.25))
    assert sweep.choose(rows) == {"vit": Hyper(lr=2e-3, weight_decay=0.25, floor=2.0)}
    assert sweep.lr_full_stage(rows)[0][0] == sweep.aug_run("vit")
    assert sweep.phase_budget("sweep-lr-full") == sweep.phase_budget("sweep-aug")
    # the first stage's choice ignores the full-budget rows (other images and budget)
    assert sweep.best(rows, "vit", augmented_only=True)["lr"] == 4e-3


def test_a_floor_binds_only_where_30_epochs_are_fewer_steps():
    b = Budget()
    assert b.steps(500, floor=2.0) == 6000 and b.steps(7500, floor=2.0) == 6000
    assert b.steps(20000, floor=2.0) == 6000  # 30 epochs of 18,000 are 4,219 steps
    assert b.steps(60000, floor=2.0) == b.steps(60000) == 13594  # epochs bind: the same run
    assert b.steps(500, scale=2.0, floor=2.0) == 12000  # a retrain doubles the whole
    assert run_steps(LabRun("vit", 3000, attempt=1), b, Hyper(floor=2.0)) == 12000


def _result_row(arch, n, hyper, steps=None):
    """A grid row of ``arch`` on ``n`` images trained with ``hyper`` (its rule's steps)."""
    from dataclasses import asdict

    from explorer.lab.engine import LabResult
    run = LabRun(arch, n)
    return LabResult(**{**{f: 0 for f in grid.COLUMNS}, "arch": arch, "train_images": n,
                        "width": run.width, "depth": run.depth, "variant": run.variant,
                        "budget": 1.0, **asdict(hyper), "curve": [(1, 0.5, 0.5)],
                        "steps": steps or run_steps(run, Budget(), hyper)})


def test_floor_runs_trained_ahead_import_as_the_floor_stages_and_resume_there(
        tmp_path, monkeypatch):
    """scripts/lab_floor_check.py trains the stage's runs as budget-scaled runs; --import
    turns a finished one into the stage's row and a checkpoint into the stage's checkpoint
    (its run and hyperparameters: what `run_lab` compares when it resumes)."""
    import importlib.util
    from dataclasses import asdict
    from pathlib import Path

    from explorer.lab import sweep
    spec = importlib.util.spec_from_file_location(
        "lab_floor_check", Path(__file__).resolve().parents[1] / "scripts/lab_floor_check.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "OUT", tmp_path / "runs" / "floor_check.csv")
    monkeypatch.setattr(grid, "SWEEP_CSV", tmp_path / "sweep.csv")
    monkeypatch.setattr(grid, "CHECKPOINTS_DIR", tmp_path / "checkpoints")
    hyper = Hyper(lr=4e-3)
    ahead = replace(sweep.aug_run("vit"), budget=2.0)
    row = replace(_result_row("vit", sweep.AUG_IMAGES, hyper,
                              steps=run_steps(ahead, sweep.AUG_RULE, hyper)), budget=2.0)
    grid.append_row(row, script.OUT)
    cnn_ahead = replace(sweep.aug_run("cnn"), budget=4.0)
    torch.save({"step": 7, "extra": {"run": asdict(cnn_ahead), "hyper": asdict(Hyper(lr=8e-3)),
                                     "steps": 12000, "curve": []}},
               script.OUT.parent / f"floor-{cnn_ahead.name}.pt")
    assert script.main(["--import"]) == 0
    (imported,) = grid.read_grid(grid.SWEEP_CSV)
    assert (imported["budget"], imported["floor"], imported["steps"]) == (1.0, 2.0, 6000)
    assert sweep._stage_row([imported], "vit", replace(hyper, floor=2.0)) is not None
    assert not list(script.OUT.parent.glob("*.pt"))
    moved = torch.load(grid.checkpoint_path(sweep.aug_run("cnn"), Hyper(lr=8e-3, floor=4.0)),
                       weights_only=False)
    assert moved["step"] == 7 and moved["extra"]["run"] == asdict(sweep.aug_run("cnn"))
    assert moved["extra"]["hyper"]["floor"] == 4.0
    assert script.main(["--import"]) == 0  # again: nothing twice
    assert len(grid.read_grid(grid.SWEEP_CSV)) == 1


def test_a_new_floor_supersedes_the_runs_whose_steps_it_changes_and_relabels_the_rest(
        tmp_path, monkeypatch):
    from dataclasses import asdict
    for name in ("GRID_CSV", "ATTEMPTS_CSV", "SUPERSEDED_CSV"):
        monkeypatch.setattr(grid, name, tmp_path / f"{name}.csv")
    monkeypatch.setattr(grid, "CHECKPOINTS_DIR", tmp_path)
    old, new = Hyper(lr=4e-3), Hyper(lr=4e-3, floor=2.0)
    grid.append_row(_result_row("vit", 500, old), grid.GRID_CSV)  # 3,000 steps: now 6,000
    grid.append_row(_result_row("vit", 60000, old), grid.GRID_CSV)  # 13,594 either way
    grid.append_row(_result_row("cnn", 500, Hyper(lr=8e-3)), grid.GRID_CSV)
    for n in (1200, 60000):  # in progress: 3,000 steps (stale), 13,594 (the same run)
        run = LabRun("vit", n)
        torch.save({"extra": {"run": asdict(run), "hyper": asdict(old),
                              "steps": run_steps(run, Budget(), old)}},
                   grid.checkpoint_path(run))
    choice = {"vit": new, "cnn": Hyper(lr=8e-3)}
    assert grid.supersede(choice) == 1
    kept = grid.read_grid(grid.GRID_CSV)
    assert [(r["arch"], r["train_images"], r["steps"], r["floor"]) for r in kept] == [
        ("vit", 60000, 13594, 2.0), ("cnn", 500, 3000, 1.0)]
    assert {Hyper.of(r) for r in kept} == {new, Hyper(lr=8e-3)}  # every row: the choice
    assert [(r["train_images"], r["steps"]) for r in grid.read_grid(grid.SUPERSEDED_CSV)] == [
        (500, 3000)]
    assert [p.name for p in tmp_path.glob("*.pt")] == ["vit-w64-d4-n60000-s0.pt"]
    assert grid.supersede(choice) == 0


def test_a_new_choice_supersedes_the_rows_and_checkpoints_trained_with_the_old(
        tmp_path, monkeypatch):
    from dataclasses import asdict

    from explorer.lab import checkpoint as grid_checkpoint
    for name in ("GRID_CSV", "ATTEMPTS_CSV", "SUPERSEDED_CSV"):
        monkeypatch.setattr(grid, name, tmp_path / f"{name}.csv")
    monkeypatch.setattr(grid, "CHECKPOINTS_DIR", tmp_path)
    old, new = Hyper(lr=4e-3, shift=0, flip=False), Hyper(lr=4e-3)
    result = _result_row
    grid.append_row(result("vit", 500, old), grid.GRID_CSV)  # the patched paths, explicitly
    grid.append_row(result("cnn", 500, Hyper(lr=8e-3)), grid.GRID_CSV)
    grid.append_row(result("vit", 60000, old), grid.ATTEMPTS_CSV)
    for arch, hyper in (("vit", old), ("cnn", Hyper(lr=8e-3))):
        run = LabRun(arch, 1200)
        torch.save({"extra": {"run": asdict(run), "hyper": asdict(hyper)}},
                   grid.checkpoint_path(run))
    # a sweep run's checkpoint (named with its own hyperparameters) is the sweep's business
    sweep_run = LabRun("vit", 3000)
    torch.save({"extra": {"run": asdict(sweep_run), "hyper": asdict(old)}},
               grid.checkpoint_path(sweep_run, old))
    models = tmp_path / "models"
    monkeypatch.setattr(grid_checkpoint, "MODELS_DIR", models)
    for arch in ("vit", "cnn"):
        path = grid_checkpoint.shipped_path(LabRun(arch, 500))
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"weights")
    choice = {"vit": new, "cnn": Hyper(lr=8e-3)}
    assert grid.supersede(choice) == 2
    assert sorted(p.name for p in models.iterdir()) == ["cnn-w24-d2-n500-s0.safetensors"]
    assert [(r["arch"], r["train_images"]) for r in grid.read_grid(grid.GRID_CSV)] == [
        ("cnn", 500)]
    assert grid.read_grid(grid.ATTEMPTS_CSV) == []
    assert sorted((r["arch"], r["train_images"], r["shift"])
                  for r in grid.read_grid(grid.SUPERSEDED_CSV)) == [("vit", 500, 0),
                                                                     ("vit", 60000, 0)]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == [
        "cnn-w24-d2-n1200-s0.pt", "vit-w64-d4-n3000-s0-lr0.004-wd0.05-shift0.pt"]
    assert grid.supersede(choice) == 0  # nothing left to move


@pytest.mark.skipif(not paths.HYPER_JSON.is_file(), reason="the sweep has not finished")
def test_the_shipped_hyperparameters_are_the_sweeps_best_on_validation():
    """For every architecture whose first three stages have finished, the shipped learning
    rate, augmentation and floor are theirs; once the weight-decay stage has finished for all
    (the grid's driver writes the choice then), the shipped choice is the sweep's."""
    from explorer.lab import sweep
    rows = grid.read_grid(grid.SWEEP_CSV)
    floored = sweep.choose_floor(rows)
    if not floored:
        pytest.skip("the floor stage is training")
    shipped = sweep.read_choice()
    chosen = sweep.choose(rows)
    if set(chosen) == set(LAB_ARCHS):  # the driver writes the choice once all have finished
        assert shipped == chosen
    for arch, hyper in floored.items():
        assert (shipped[arch].lr, shipped[arch].augmentation(), shipped[arch].floor) == (
            hyper.lr, hyper.augmentation(), hyper.floor)
        quarter = [r for r in rows if r["arch"] == arch and r["budget"] == sweep.SWEEP_BUDGET]
        assert {r["lr"] for r in quarter} >= set(sweep.LRS)  # every rate was tried
        lr_best = max((r for r in quarter if r["shift"] or r["flip"]), key=lambda r: r["val_acc"])
        assert hyper.lr == lr_best["lr"]
        stage = [r for r in rows if r["arch"] == arch and r["train_images"] == sweep.AUG_IMAGES]
        full = [r for r in stage if r["floor"] == 1.0 and r["weight_decay"] == 0.05
                and r["lr"] == hyper.lr]  # the augmentation stage's (not the later walks')
        assert {(r["shift"], r["flip"], r["val_images"]) for r in full} == {
            (0, False, 2000), (2, True, 2000)}
        assert max(r["val_acc"] for r in full) == next(
            r["val_acc"] for r in full if (r["shift"], r["flip"]) == (hyper.shift, hyper.flip))
        floors = {r["floor"]: r["val_acc"] for r in stage
                  if Hyper.of(r).recipe() == hyper.recipe()}
        # the chosen floor's doubling, where tried, gained less than a point; each doubling
        # up to it gained at least one
        assert floors.get(2 * hyper.floor, 0) < floors[hyper.floor] + sweep.STAGE_GAIN
        f = 1.0
        while f < hyper.floor:
            assert floors[2 * f] >= floors[f] + sweep.STAGE_GAIN
            f *= 2
        if arch not in chosen:
            continue
        # the weight decay, then the learning rate: the first value unless a neighbour
        # validated a point better, and the chosen value's neighbours (where tried) do not
        # validate a point better than it
        for field, ladder, first in (("weight_decay", sweep.WDS, hyper),
                                     ("lr", sweep.LR_LADDER, sweep.choose_wd(rows)[arch])):
            walked = {getattr(Hyper.of(r), field): r["val_acc"] for r in stage
                      if replace(Hyper.of(r), **{field: getattr(first, field)}) == first}
            start, value = getattr(first, field), getattr(chosen[arch], field)
            i = ladder.index(start)
            assert {ladder[i - 1], start, ladder[i + 1]} <= set(walked)
            assert value == start or walked[value] >= walked[start] + sweep.STAGE_GAIN
            i = ladder.index(value)
            for j in (i - 1, i + 1):
                if 0 <= j < len(ladder) and ladder[j] in walked:
                    assert walked[ladder[j]] < walked[value] + sweep.STAGE_GAIN


def test_the_scaling_figure_says_the_size_sweep_is_still_training_before_its_first_run():
    from explorer.plots import lab as plots
    cnn_only = [{"arch": "cnn", "variant": "original", "width": 24, "depth": 2, "budget": 1.0}]
    for rows in ([], cnn_only):
        fig = plots.scaling_figure(rows)
        assert not fig.data
        assert fig.layout.annotations[0].text == "The ViT size sweep is still training"


@shipped
def test_every_lab_figure_renders_from_the_shipped_grid():
    """The grid lands in stages: each figure draws what has finished."""
    from explorer.lab.checkpoint import shipped_path
    from explorer.lab.models import ARCH_LABELS
    from explorer.plots import lab as plots
    rows = grid.read_grid()
    fig = plots.error_vs_data_figure(analysis.error_vs_data(rows),
                                     {"arch": "vit", "train_images": 500, "error": 0.3})
    finished = {r["arch"] for r in rows if analysis.is_main(r)}
    assert {t.name for t in fig.data if t.showlegend is not False} - {"your run: ViT (absolute "
                                                                       "positions)"} == {
        ARCH_LABELS[a] for a in finished}
    assert fig.data[-1].marker.symbol == "star"
    curves = analysis.compute_curves(rows)
    if curves:
        compute = plots.compute_figure(curves)
        assert {f"w{c.width}" for c in curves} <= {
            t.name.split(" (")[0] for t in compute.data}
    kept = [a for a in ("cnn", "vit", "vit_rel") if shipped_path(LabRun(a, 60000)).is_file()]
    if "vit_rel" in kept:
        bias = plots.relative_bias_figure(analysis.relative_tables(load_shipped("vit_rel", 60000)))
        assert len(bias.data) == 4 * 4 and bias.data[0].z.shape == (13, 13)
    if kept:
        table = analysis.shift_equivariance_table(
            {a: load_shipped(a, 60000) for a in kept}, torch.randn(4, 3, 28, 28))
        assert len(plots.shift_figure(table, 4).data) == sum(1 + ("attention" in table[a])
                                                             for a in kept)


@needs_fmnist
def test_a_grid_worker_skips_claimed_and_finished_runs_and_appends_rows(tmp_path, monkeypatch):
    from explorer.lab import sweep
    runs = [LabRun("cnn", 40, 0), LabRun("vit", 40, 0), LabRun("cnn", 40, 1)]
    monkeypatch.setattr(grid, "GRID_CSV", tmp_path / "grid.csv")
    monkeypatch.setattr(grid, "CHECKPOINTS_DIR", tmp_path / "checkpoints")
    monkeypatch.setattr(grid, "grid_runs", lambda: runs)
    monkeypatch.setattr(sweep, "read_choice", lambda: {a: Hyper(lr=2e-3) for a in LAB_ARCHS})
    tiny = Budget(min_steps=3, epochs=0, batch=8, evals=1, test_images=50, max_attempts=1)
    assert grid._claim(runs[1].name)  # another worker is training it
    assert grid.work("grid", budget=tiny) == 0
    rows = grid.read_grid(tmp_path / "grid.csv")
    assert [grid.row_key(r) for r in rows] == [runs[0].name, runs[2].name]
    assert all(r["lr"] == 2e-3 and r["steps"] == 3 for r in rows)
    assert not list((tmp_path / "checkpoints").glob("*.pt"))  # finished: no checkpoint left
    grid._release(runs[1].name)
    grid.work("grid", budget=tiny)  # the released run now, the finished ones never again
    assert [grid.row_key(r) for r in grid.read_grid(tmp_path / "grid.csv")] == [
        runs[0].name, runs[2].name, runs[1].name]
    status = grid.status(tiny)
    assert len(status["done"]) == 3 and status["training"] == [] and status["todo"] == []


@needs_fmnist
def test_a_run_that_has_not_converged_trains_again_with_twice_the_steps(tmp_path, monkeypatch):
    from explorer.lab import sweep
    run = LabRun("cnn", 40, 0)
    for name in ("GRID_CSV", "ATTEMPTS_CSV"):
        monkeypatch.setattr(grid, name, tmp_path / f"{name}.csv")
    monkeypatch.setattr(grid, "CHECKPOINTS_DIR", tmp_path / "checkpoints")
    monkeypatch.setattr(grid, "grid_runs", lambda: [run])
    monkeypatch.setattr(sweep, "read_choice", lambda: {"cnn": Hyper()})
    monkeypatch.setattr(grid, "convergence", lambda row: analysis.Convergence(0.01, 0.0, False))
    tiny = Budget(min_steps=3, epochs=0, batch=8, evals=1, test_images=50, max_attempts=3)
    grid.work("grid", budget=tiny)
    tried = grid.read_grid(tmp_path / "ATTEMPTS_CSV.csv")
    assert [(r["attempt"], r["steps"]) for r in tried] == [(0, 3), (1, 6)]
    (final,) = grid.read_grid(tmp_path / "GRID_CSV.csv")
    assert (final["attempt"], final["steps"], grid.row_key(final)) == (2, 12, run.name)
    assert "up to 4×" in tiny.sentence()


@needs_fmnist
def test_a_second_seed_starts_at_the_steps_its_first_seed_kept(tmp_path, monkeypatch):
    from explorer.lab import sweep
    first, second = LabRun("cnn", 40, 0), LabRun("cnn", 40, 1)
    for name in ("GRID_CSV", "ATTEMPTS_CSV"):
        monkeypatch.setattr(grid, name, tmp_path / f"{name}.csv")
    monkeypatch.setattr(grid, "CHECKPOINTS_DIR", tmp_path / "checkpoints")
    monkeypatch.setattr(grid, "grid_runs", lambda: [first, second])
    monkeypatch.setattr(sweep, "read_choice", lambda path=None: {"cnn": Hyper()})
    # seed 0's first attempt (3 steps) is still gaining; every longer one has converged
    monkeypatch.setattr(grid, "convergence", lambda row: analysis.Convergence(
        0.01, 0.0, row["steps"] > 3))
    tiny = Budget(min_steps=3, epochs=0, batch=8, evals=1, test_images=50, max_attempts=3)
    # while seed 0 trains (another worker's claim), its second seed waits for its steps
    assert grid._claim(first.name)
    assert grid.replicates_waiting(grid.unfinished("grid")[1]) == {second.name}
    assert grid._next("grid") is None
    # a worker with only that second seed left waits for it (rather than exit and leave a
    # core idle); here the other worker gives seed 0 up while it waits, so it trains both
    monkeypatch.setattr(grid, "STOP", __import__("threading").Event())
    waits = []
    monkeypatch.setattr(grid.STOP, "wait", lambda s: (waits.append(s), grid._release(first.name)))
    grid.work("grid", budget=tiny)
    assert waits == [grid.WAIT_S]
    # seed 0 trained again with twice the steps; seed 1 started there: 6 steps, no first try
    assert [(r["seed"], r["attempt"], r["steps"])
            for r in grid.read_grid(tmp_path / "ATTEMPTS_CSV.csv")] == [(0, 0, 3)]
    assert [(r["seed"], r["attempt"], r["steps"])
            for r in grid.read_grid(tmp_path / "GRID_CSV.csv")] == [(0, 1, 6), (1, 1, 6)]
    assert grid.next_attempts() == {first.name: 1, second.name: 1}
    assert grid.replicates_waiting([(second, None)]) == set()  # seed 0's row is in


def test_a_grid_run_checkpoints_where_the_status_looks(tmp_path, monkeypatch):
    from explorer.lab import sweep
    run = LabRun("vit", 40, 0)
    monkeypatch.setattr(grid, "GRID_CSV", tmp_path / "grid.csv")
    monkeypatch.setattr(grid, "CHECKPOINTS_DIR", tmp_path / "checkpoints")
    monkeypatch.setattr(grid, "grid_runs", lambda: [run])
    monkeypatch.setattr(sweep, "read_choice", lambda: {"vit": Hyper(lr=4e-3, shift=0)})
    paths = []

    def stopped(run, hyper, budget, checkpoint):  # the session stops mid-run
        paths.append(checkpoint)
        raise KeyboardInterrupt

    monkeypatch.setattr(grid, "_train_one", stopped)
    with pytest.raises(KeyboardInterrupt):
        grid.work("grid")
    # named by the run, not suffixed with the hyperparameters
    assert paths == [tmp_path / "checkpoints" / f"{run.name}.pt"]
    torch.save({"step": 7}, paths[0])
    assert grid.status()["training"] == [(run.name, 7, Budget().steps(40))]
    assert grid.status()["running"] == []  # begun, and no worker holds it: waiting
    assert grid._claim(grid.work_key(run))  # a live worker (this process) holds it
    assert grid.status()["running"] == [run.name]
    dead = _dead_pid()
    (tmp_path / "checkpoints" / f"{grid.work_key(run)}.claim").write_text(f"{dead}\n")
    assert grid.status()["running"] == []  # a claim its worker left behind when it died
    grid._release(grid.work_key(run))
    assert grid.status()["here"] == []  # a checkpoint that records no start
    # started here at step 2 (10 training seconds), saved at step 7 (40 s): 5 steps, 30 s here
    host = engine.machine_id()
    starts = [{"machine": "elsewhere", "step": 0, "seconds": 0.0},
              {"machine": host, "step": 2, "seconds": 10.0}]
    torch.save({"step": 7, "seconds": 40.0, "extra": {"starts": starts}}, paths[0])
    assert grid.status()["here"] == [(run.name, 5, 30.0)]
    torch.save({"step": 7, "seconds": 40.0, "extra": {"starts": starts[:1]}}, paths[0])
    assert grid.status()["here"] == []  # last started on another machine


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess
    import sys
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_time_left_is_timed_by_finished_runs_and_the_sweep_scaled_to_the_grid(monkeypatch):
    from explorer.lab import sweep
    monkeypatch.setattr(sweep, "read_choice", lambda path=None: {})  # every floor 1×
    cnn, vit = LabRun("cnn", 500), LabRun("vit", 500)
    # the CNN's grid runs: 300 s for 1,000 steps at 10 FLOPs, 0.03 s per step and FLOP; its
    # sweep ran at 0.06, so the grid is 0.5× the sweep; the ViT, swept at 0.1, gets 0.05
    rows = [dict(arch="cnn", seconds=300.0, steps=1000, flops=10)]
    sweep_rows = [dict(arch="cnn", seconds=600.0, steps=1000, flops=10),
                  dict(arch="vit", seconds=100.0, steps=100, flops=10)]
    progress = {"todo": [vit.name],  # 3,000 steps (the rule's floor on 500 images)
                "training": [(replace(cnn, attempt=1).name, 1000, 6000)]}  # 5,000 left
    left = grid.remaining_seconds(progress, rows, sweep_rows, flops=lambda run: 10)
    assert left == pytest.approx(5000 * 10 * 0.03 + 3000 * 10 * 0.05)
    # a sweep stage still to train adds its runs, whole, at its own rule's steps: the
    # weight-decay stage's ViT at twice the floor, 6,000 steps
    stage = {"sweep-wd": [(sweep.aug_run("vit"), Hyper(weight_decay=0.25, floor=2.0))]}
    assert grid.remaining_seconds(progress, rows, sweep_rows, flops=lambda run: 10,
                                  sweep_left=stage) == pytest.approx(left + 6000 * 10 * 0.05)
    # an architecture nothing has timed yet: no estimate rather than a wrong one
    progress["todo"].append(LabRun("coatnet", 500).name)
    assert grid.remaining_seconds(progress, rows, sweep_rows, flops=lambda run: 10) is None


def test_this_machine_is_timed_against_the_finished_runs_by_the_runs_in_flight():
    cnn, vit = LabRun("cnn", 500), LabRun("vit", 500)
    # the rows: the CNN at 0.03 s per step and FLOP, the ViT at 0.05; at 10 FLOPs a run,
    # 0.3 and 0.5 s per step
    rows = [dict(arch="cnn", seconds=300.0, steps=1000, flops=10),
            dict(arch="vit", seconds=500.0, steps=1000, flops=10)]
    # a GPU's runs are no core's speed: they time nothing
    rows += [dict(arch="vit", seconds=5.0, steps=1000, flops=10, device=d)
             for d in ("cuda", "cpu+cuda", "cuda")]
    # here: the CNN 0.6 s per step (2×), the ViT 0.75 (1.5×); median of the two 1.75
    progress = {"here": [(cnn.name, 500, 300.0), (vit.name, 400, 300.0)]}
    assert grid.machine_factor(progress, rows, flops=lambda run: 10) == pytest.approx(1.75)
    # a run just (re)started here times nothing yet: compiling and warm-up would dominate
    progress["here"][1] = (vit.name, grid.HERE_MIN_STEPS - 1, 300.0)
    assert grid.machine_factor(progress, rows, flops=lambda run: 10) == pytest.approx(2.0)
    assert grid.machine_factor({"here": []}, rows, flops=lambda run: 10) is None


@needs_fmnist
def test_each_start_of_a_run_records_its_machine_and_where_it_started(tmp_path):
    run = LabRun("cnn", 50, 0)
    budget = Budget(min_steps=12, epochs=0, batch=8, evals=2, test_images=100,
                    checkpoint_every_s=1e9)
    ckpt = tmp_path / "run.pt"
    for stop_at in (4, 9):  # started, stopped at step 4; resumed, stopped at step 9
        cancel = __import__("threading").Event()
        for event in run_lab(run, budget, Hyper(lr=2e-3), cancel=cancel, checkpoint=ckpt,
                             log_every=1):
            if event.step == stop_at:
                cancel.set()
    state = torch.load(ckpt, weights_only=False)
    starts, host = state["extra"]["starts"], engine.machine_id()
    assert state["step"] == 9
    assert [(s["machine"], s["device"], s["step"]) for s in starts] == [(host, "cpu", 0),
                                                                         (host, "cpu", 4)]
    assert starts[0]["seconds"] == 0 and 0 < starts[1]["seconds"] < state["seconds"]
    # the row names what trained it: had the first start been a GPU's (`device_grid.sh`),
    # the run's seconds add both machines', and the row says so
    starts[0]["device"] = "cuda"
    torch.save(state, ckpt)
    result = list(run_lab(run, budget, Hyper(lr=2e-3), checkpoint=ckpt))[-1].result
    assert result.device == "cpu+cuda" and result.row()["device"] == "cpu+cuda"


def test_a_run_names_the_devices_its_starts_trained_on():
    assert engine.trained_on([{"device": "cpu"}, {"device": "cpu"}]) == "cpu"
    assert engine.trained_on([{"device": "cuda"}]) == "cuda"
    assert engine.trained_on([{"device": "cuda"}, {"device": "cpu"}]) == "cpu+cuda"
    assert engine.trained_on([{"machine": "m", "step": 0}]) == "cpu"  # saved before devices


def test_a_row_from_before_rows_named_their_device_was_trained_on_a_cpu(tmp_path):
    path = tmp_path / "grid.csv"
    old_columns = [c for c in grid.COLUMNS if c != "device"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_columns)
        writer.writeheader()
        writer.writerow({**{c: 0 for c in old_columns}, "arch": "cnn", "variant": "original",
                         "flip": "False", "curve": "[]"})
    assert grid.read_grid(path)[0]["device"] == "cpu"


@needs_fmnist
def test_the_channels_last_layout_changes_the_speed_not_the_run(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from explorer.lab import engine
    run, budget = LabRun("cnn", 50, 0), Budget(min_steps=6, epochs=0.5, batch=8, evals=2,
                                               test_images=100)

    def losses_and_result():
        events = list(run_lab(run, budget, log_every=1))
        return [e.loss for e in events[:-1]], events[-1].result

    fast_losses, fast = losses_and_result()
    monkeypatch.setattr(engine, "LAYOUT", torch.contiguous_format)
    plain_losses, plain = losses_and_result()
    # the same run up to float rounding (oneDNN sums in another order in the other layout):
    # the first step's loss, before any update, to 1e-6; later ones drift a little, since
    # AdamW's normalised step turns a rounding difference in a near-zero gradient into a
    # step of up to the learning rate (1e-3 here); a layout mix-up, channels read as
    # pixels, would differ by the loss and the weights' own size
    assert fast_losses[0] == pytest.approx(plain_losses[0], rel=1e-6)
    assert fast_losses == pytest.approx(plain_losses, rel=1e-2)
    for p, q in zip(fast.model.state_dict().values(), plain.model.state_dict().values(),
                    strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-2)
    # the model handed back is in the ordinary layout: safetensors stores it as it is
    convs = [p for p in fast.model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous() for p in convs)
    state = fast.model.state_dict()
    save_file(state, tmp_path / "cnn.safetensors")
    loaded = load_file(tmp_path / "cnn.safetensors")
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_the_scramble_means_compare_over_the_same_sizes():
    rows = [_row("cnn", n, a) for n, a in ((500, 0.82), (3000, 0.88))]
    rows += [_row("vit", n, a) for n, a in ((500, 0.65), (3000, 0.80))]
    # the CNN scrambled at both sizes (-2 and -4 points), the ViT at 500 only (+2): the
    # means are over 500 alone, where both were trained both ways
    rows += [_row("cnn", 500, 0.80, variant="scrambled"),
             _row("cnn", 3000, 0.84, variant="scrambled"),
             _row("vit", 500, 0.67, variant="scrambled")]
    sentence = analysis.scramble_sentence(rows)
    assert sentence.startswith(
        "On scrambled images, test accuracy against the original images (mean over the sizes "
        "trained both ways: 500 images): the ViT (absolute positions) gains 2.0 points; the "
        "CNN loses 2.0 points.")
    # no size in common yet: each over its own sizes, and it says which
    apart = [_row("cnn", 3000, 0.88), _row("cnn", 3000, 0.84, variant="scrambled"),
             _row("vit", 500, 0.65), _row("vit", 500, 0.67, variant="scrambled")]
    assert "(mean over each one's sizes trained both ways): the ViT (absolute positions) " \
           "gains 2.0 points (500 images); the CNN loses 4.0 points (3,000 images)." in \
           analysis.scramble_sentence(apart)


@needs_fmnist
def test_a_stopped_worker_saves_its_run_and_takes_no_other(tmp_path, monkeypatch):
    from explorer.lab import sweep
    runs = [LabRun("cnn", 40, 0), LabRun("vit", 40, 0)]
    monkeypatch.setattr(grid, "GRID_CSV", tmp_path / "grid.csv")
    monkeypatch.setattr(grid, "CHECKPOINTS_DIR", tmp_path / "checkpoints")
    monkeypatch.setattr(grid, "grid_runs", lambda: runs)
    monkeypatch.setattr(sweep, "read_choice", lambda: {a: Hyper(lr=2e-3) for a in LAB_ARCHS})
    monkeypatch.setattr(grid, "STOP", __import__("threading").Event())
    tiny = Budget(min_steps=8, epochs=0, batch=8, evals=2, test_images=50, max_attempts=1,
                  checkpoint_every_s=1e9)
    from explorer.lab import engine
    real = engine.run_lab

    def stopped_at_step_4(*args, **kwargs):  # SIGTERM arrives at step 4 (its evaluation)
        for event in real(*args, **kwargs):
            if event.step == 4:
                grid.STOP.set()
            yield event

    monkeypatch.setattr(engine, "run_lab", stopped_at_step_4)
    assert grid.work("grid", budget=tiny) == 0
    assert not (tmp_path / "grid.csv").exists()  # no row: the run did not finish
    saved = torch.load(tmp_path / "checkpoints" / f"{runs[0].name}.pt", weights_only=False)
    assert saved["step"] == 4  # saved before the next step, not at a two-minute mark
    assert not list((tmp_path / "checkpoints").glob("*.claim"))  # released for the next start
    # started again, it resumes that run from its checkpoint and then trains the next
    grid.STOP.clear()
    monkeypatch.setattr(engine, "run_lab", real)
    assert grid.work("grid", budget=tiny) == 0
    assert [grid.row_key(r) for r in grid.read_grid(tmp_path / "grid.csv")] == [
        r.name for r in runs]


@needs_fmnist
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_the_grid_trains_in_fp32_and_the_live_run_in_the_apps_precision(monkeypatch):
    """The grid's rows compare across machines (fp32 everywhere, `grid.GRID_PRECISION`);
    the tab's live run asks for the app's rule ("auto") and trains even in a process that
    already trains in another precision (a GPU Space after a bf16 fine-tune)."""
    from accelerate import Accelerator

    from explorer.lab import engine

    asked = []
    monkeypatch.setattr(engine, "train", lambda *a, **k: asked.append(k["mixed_precision"]))
    grid._train_one(LabRun("cnn", 40), Hyper(), TINY, None)
    assert asked == ["no"]

    Accelerator(cpu=True, mixed_precision="bf16")  # the process's first run: bf16
    with pytest.warns(UserWarning, match="already trains with mixed precision 'bf16'"):
        events = list(run_lab(LabRun("cnn", 50, 0), TINY, Hyper(lr=2e-3)))
    assert events[-1].result is not None and events[-1].result.steps == TINY.steps(50)


def test_the_grid_takes_a_new_sweep_choice_and_moves_the_rows_of_the_old(tmp_path, monkeypatch):
    from explorer.lab import sweep
    hyper_json = tmp_path / "hyper.json"
    read, write = sweep.read_choice, sweep.write_choice
    monkeypatch.setattr(sweep, "read_choice", lambda path=hyper_json: read(path))
    monkeypatch.setattr(sweep, "write_choice", lambda choice, path=hyper_json: write(choice, path))
    moved = []
    monkeypatch.setattr(grid, "supersede", lambda choice: moved.append(choice) or 3)
    old = {a: Hyper(lr=4e-3, shift=0, flip=False) for a in LAB_ARCHS}
    new = {**old, "vit": Hyper(lr=4e-3)}
    write(old, hyper_json)
    monkeypatch.setattr(sweep, "choose", lambda rows: {a: new[a] for a in ("cnn", "vit")})
    with pytest.raises(SystemExit, match="has not finished for every architecture"):
        grid.settle_choice()  # the augmentation stage is still training: the grid waits
    assert read(hyper_json) == old and moved == []
    monkeypatch.setattr(sweep, "choose", lambda rows: new)
    assert grid.settle_choice() == 3
    assert read(hyper_json) == new and moved == [new]


def test_the_status_lists_the_sweep_runs_left_before_the_grid(tmp_path, monkeypatch):
    from explorer.lab import sweep
    monkeypatch.setattr(grid, "SWEEP_CSV", tmp_path / "sweep.csv")
    # nothing swept: every first-stage run is left, the second stage waits for its rate
    def left(phase):
        return [grid.work_key(run, hyper) for run, hyper in grid.unfinished(phase)[1]]

    assert len(left("sweep-lr")) == len(LAB_ARCHS) * len(sweep.LRS)
    assert left("sweep-aug") == []
    rows = [dict(_sweep_row("vit", lr, True, v, sweep.SWEEP_BUDGET), seed=0, attempt=0,
                 variant="original") for lr, v in zip(sweep.LRS, (.6, .7, .71, .69), strict=True)]
    monkeypatch.setattr(grid, "read_grid", lambda path=None: rows)
    assert left("sweep-aug") == [
        "vit-w64-d4-n5000-s0-lr0.004-wd0.05-shift2-flip", "vit-w64-d4-n5000-s0-lr0.004-wd0.05-shift0"]


def test_a_sweep_worker_takes_the_next_stages_runs_and_waits_for_a_walk_to_go_on(
        tmp_path, monkeypatch):
    """`grid.SWEEP`: while another worker trains a stage's last run, a worker takes the next
    stage's runs that are ready; with none, it waits (a finished run may add runs) rather
    than leave a core idle until the driver's next phase, and stops once the sweep is done."""
    from types import SimpleNamespace

    from explorer.lab import sweep
    monkeypatch.setattr(grid, "CHECKPOINTS_DIR", tmp_path)
    monkeypatch.setattr(grid, "STOP", __import__("threading").Event())
    wd, lr = sweep.aug_run("coatnet"), sweep.aug_run("vit")
    stages = {"sweep-wd": [(wd, Hyper(weight_decay=0.25))], "sweep-lr-full": [(lr, Hyper())]}
    monkeypatch.setattr(grid, "unfinished", lambda stage: (tmp_path / "sweep.csv",
                                                           list(stages.get(stage, []))))
    assert grid._claim(grid.work_key(wd, Hyper(weight_decay=0.25)))  # the other worker's
    stage, _, run, hyper = grid._next(grid.SWEEP)
    assert (stage, run, hyper) == ("sweep-lr-full", lr, Hyper())
    assert grid._next("sweep-wd") is None  # a single stage's worker: nothing for it

    trained, waits = [], []

    def train(run, hyper, budget, checkpoint):
        trained.append((run.arch, budget))
        stages["sweep-lr-full"] = []  # its row has landed
        return SimpleNamespace(test_acc=0.8, val_acc=0.8, train_acc=0.9, seconds=1.0)

    def wait(seconds):  # the other worker's last run lands while this one waits
        waits.append(seconds)
        stages["sweep-wd"] = []
        stages["sweep-lr-full"] = [(sweep.aug_run("cnn"), Hyper(lr=4e-3))]  # the walk goes on
        grid._release(grid.work_key(wd, Hyper(weight_decay=0.25)))

    grid._release(grid.work_key(lr, Hyper()))
    monkeypatch.setattr(grid, "_train_one", train)
    monkeypatch.setattr(grid, "append_row", lambda result, path: None)
    monkeypatch.setattr(grid, "sweep_left", lambda: {s: i for s, i in stages.items() if i})
    monkeypatch.setattr(grid.STOP, "wait", wait)
    assert grid.work(grid.SWEEP) == 0
    # the ready run first, at its stage's rule; then a wait; then the run the wait added
    rule = sweep.phase_budget("sweep-lr-full")
    assert trained == [("vit", rule), ("cnn", rule)] and waits == [grid.WAIT_S]


def test_a_kept_model_is_cached_until_the_grid_writes_a_new_one(tmp_path, monkeypatch):
    from explorer.cache import KeyedCache
    from explorer.lab import checkpoint as lab_checkpoint

    monkeypatch.setattr(lab_checkpoint, "MODELS_DIR", tmp_path)
    monkeypatch.setattr(lab_checkpoint, "_SHIPPED", KeyedCache(max_items=8))
    run = LabRun("vit", 500)
    with pytest.raises(FileNotFoundError, match="kept no model for vit-w64-d4-n500-s0"):
        load_shipped("vit", 500)
    first, second = build(run.spec, seed=0), build(run.spec, seed=1)
    lab_checkpoint.save_shipped(first, run)
    loaded = load_shipped("vit", 500)
    assert load_shipped("vit", 500) is loaded  # the same file: read once
    torch.testing.assert_close(loaded.state_dict(), first.state_dict(), rtol=0, atol=0)
    lab_checkpoint.save_shipped(second, run)  # the grid replaces it while the app serves
    torch.testing.assert_close(load_shipped("vit", 500).state_dict(), second.state_dict(),
                               rtol=0, atol=0)


def test_workers_share_out_the_cores_and_a_lone_worker_takes_them_all(monkeypatch, tmp_path):
    assert grid.threads_per_request(2, cores=2) == 1  # two 1-thread workers on 2 cores
    assert grid.threads_per_request(1, cores=2) == 2  # the last run left: both cores
    assert grid.threads_per_request(12, cores=16) == 1  # the GPU machine's 12 workers
    assert grid.threads_per_request(3, cores=2) == 1  # never fewer than one
    # the driver starts each worker process with its share (the real command line, parsed by
    # the real `main`; the process is not started)
    commands = []

    class Started:
        def __init__(self, cmd):
            commands.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setattr(grid.subprocess, "Popen", Started)
    monkeypatch.setattr(grid, "CHECKPOINTS_DIR", tmp_path)  # a running grid's claims stay
    monkeypatch.setattr(grid.signal, "signal", lambda *a: None)  # pytest's handlers stay
    assert grid.drive(1, phases=(grid.SWEEP,)) == 0
    assert grid.drive(2, phases=(grid.SWEEP,), threads=3) == 0
    assert [c[c.index("--threads") + 1] for c in commands] == [
        str(grid.threads_per_request(1)), "3", "3"]
    seen = []
    monkeypatch.setattr(grid, "work", lambda phase, limit, threads: seen.append(threads) or 0)
    monkeypatch.setattr(grid, "keep_freed_memory", lambda: True)
    monkeypatch.setattr(grid, "pause_on_sigtstp", lambda: None)
    assert grid.main(commands[0][3:]) == 0
    assert seen == [grid.threads_per_request(1)]


def test_a_grid_worker_takes_the_threads_it_is_given(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(grid, "_next", lambda phase: None)
    monkeypatch.setattr(grid, "replicates_waiting", lambda items: set())
    try:
        for n in (2, 1):
            assert grid.work("grid", threads=n) == 0
            assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(before)


def test_a_grid_worker_trains_in_ieee_fp32_on_a_gpu_too(monkeypatch):
    # cuDNN's default runs fp32 convolutions in TF32; a worker turns that off before its first
    # run (the flags are the process's, so they are put back after)
    before = (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision(),
              torch.get_num_threads())
    monkeypatch.setattr(grid, "_next", lambda phase: None)  # nothing to train: it returns
    monkeypatch.setattr(grid, "replicates_waiting", lambda items: set())
    try:
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        assert grid.work("grid") == 0
        assert torch.backends.cudnn.allow_tf32 is False
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.backends.cudnn.allow_tf32 = before[0]
        torch.set_float32_matmul_precision(before[1])
        torch.set_num_threads(before[2])  # a worker takes one thread
