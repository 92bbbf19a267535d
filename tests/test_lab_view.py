"""What the lab tab and the Lecture's lab steps say: computed from the grid's rows, derived by
hand here on made-up rows (and checked against the figure they sit under)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from explorer.lab import grid
from explorer.lab.engine import LIVE_BUDGET, Budget, Hyper, LabRun
from explorer.lab.models import DEFAULT_SIZES
from explorer.plots import lab as plots
from explorer.ui import lab_view


def _row(arch, n, acc, seed=0, variant="original", train=None, curve=None, steps=3000):
    width, depth = DEFAULT_SIZES[arch]
    return dict(arch=arch, width=width, depth=depth, train_images=n, seed=seed, test_acc=acc,
                train_acc=train if train is not None else acc + 0.02, variant=variant,
                budget=1.0, steps=steps, curve=curve or [(2400, acc, acc), (3000, acc, acc)],
                params=200_000, seconds=60.0, attempt=0)


ROWS = [_row("cnn", 500, 0.82), _row("cnn", 60000, 0.92), _row("vit", 500, 0.70),
        _row("vit", 60000, 0.90), _row("cnn", 500, 0.70, variant="scrambled"),
        _row("vit", 500, 0.705, variant="scrambled")]


def test_summary_says_who_wins_how_the_gap_moves_and_the_papers_scale():
    text = lab_view.summary_text(ROWS)
    assert "Lowest test error: **CNN** at 500–60,000 images." in text
    assert ("The ViT (absolute positions) is 12.0 points behind the CNN at 500 images and 2.0 "
            "points behind it at 60,000: the gap narrows with data.") in text
    assert "10⁷–10⁸" in text
    assert lab_view.summary_text([]) == lab_view.NO_GRID


def test_the_summary_agrees_with_the_plotted_points():
    fig = plots.data_figure(ROWS)
    lines = {t.name: dict(zip(t.x, t.y, strict=True)) for t in fig.data if t.name}
    cnn, vit = lines["CNN"], lines["ViT (absolute positions)"]
    gap_small, gap_large = vit[500] - cnn[500], vit[60000] - cnn[60000]
    assert f"{gap_small:.1f} points behind" in lab_view.summary_text(ROWS)
    assert f"{gap_large:.1f} points behind" in lab_view.summary_text(ROWS)
    # the axis is labelled at exactly the sizes trained (a log axis alone labels 500 as "5")
    assert list(fig.layout.xaxis.tickvals) == [500, 60000]
    assert list(fig.layout.xaxis.ticktext) == ["500", "60k"]
    live = plots.data_figure(ROWS, {"arch": "vit", "train_images": 1200, "error": 0.3})
    assert list(live.layout.xaxis.ticktext) == ["500", "1.2k", "60k"]


def test_the_seed_spread_in_the_summary_is_the_widest_band_in_the_figure():
    # a second seed of the CNN on 60,000 (90.5% against 92%) and of the ViT on 500 (70.5%
    # against 70%): bands 1.5 and 0.5 points wide, median 1.0
    rows = ROWS + [_row("cnn", 60000, 0.905, seed=1), _row("vit", 500, 0.705, seed=1)]
    assert "Seeds:" not in lab_view.summary_text(ROWS)
    text = lab_view.summary_text(rows)
    assert ("Seeds: 2 runs of the grid have finished with a second seed; the seeds of "
            "a run land within 1.5 points of each other in test accuracy (median 1.0;") in text
    fig = plots.data_figure(rows)
    bands = [t for t in fig.data if t.fill == "toself"]
    widths = [max(h - lo for h, lo in zip(t.y[:len(t.y) // 2], t.y[len(t.y) // 2:][::-1],
                                          strict=True)) for t in bands]
    assert max(widths) == pytest.approx(1.5)


def test_scrambled_text_and_figure_show_the_same_runs():
    text = lab_view.scrambled_text(ROWS)
    assert "the ViT (absolute positions) is unchanged (+0.5 points); the CNN loses 12.0" in text
    fig = plots.scrambled_figure(ROWS)
    solid = {t.name: list(t.y) for t in fig.data if t.name and t.mode == "lines+markers"}
    assert solid == {"CNN": pytest.approx([30.0]), "ViT (absolute positions)": pytest.approx([29.5])}
    dotted = [t for t in fig.data if t.line.dash == "dot"]
    assert {t.name for t in dotted} == {"CNN, original images",
                                        "ViT (absolute positions), original images"}
    assert "No scrambled run" in lab_view.scrambled_text(ROWS[:4])


def test_convergence_text_names_the_runs_that_fail():
    late = _row("vit", 500, 0.70, curve=[(2400, 0.60, 0.7), (3000, 0.70, 0.72)])
    text = lab_view.convergence_text(ROWS + [late])
    assert "6 of 7 finished runs pass" in text
    assert "not: ViT (absolute positions), 500 images, seed 0 (gain +10.0" in text
    assert text.endswith("train − test +2.0).")  # at its first attempt: no more to say
    assert lab_view.convergence_text(ROWS).endswith("6 of 6 finished runs pass.")
    # at the rule's last attempt (attempt 2: 4× the steps) the run is kept as it is
    last = dict(late, attempt=2)
    assert lab_view.convergence_text(ROWS + [last]).endswith(
        "train − test +2.0). It failed at the rule's last attempt (4× the steps) and is kept "
        "as it is: the rule trains no longer.")
    both = [last, dict(last, seed=1)]
    assert "+2.0). Each failed at the rule's last attempt" in lab_view.convergence_text(ROWS + both)
    # one at an earlier attempt among them: no such sentence
    assert "last attempt" not in lab_view.convergence_text(ROWS + [last, late])


def test_convergence_text_leaves_out_the_size_sweeps_short_budgets():
    # a narrower ViT at a quarter of the steps, still climbing: a frontier point, not a run
    # the rule applies to, so it is neither counted nor named
    short = dict(_row("vit", 20000, 0.76, curve=[(1200, 0.70, 0.7), (1500, 0.76, 0.77)]),
                 width=32, budget=0.25)
    assert lab_view.convergence_text(ROWS + [short]).endswith(
        "6 of 6 finished runs pass (the size sweep's 1 finished run, trained to fixed budgets "
        "on purpose, is not checked).")
    two = [short, dict(short, width=48)]
    assert "(the size sweep's 2 finished runs, trained to fixed budgets on purpose, are not " \
        "checked)" in lab_view.convergence_text(ROWS + two)


def test_progress_text_says_what_is_still_training():
    status = {"done": ["a", "b"], "training": [("cnn-w24-d2-n60000-s0", 4000, 13594)],
              "todo": ["c", "d", "e"]}
    text = lab_view.progress_text(status)
    assert "2 of 6 runs finished" in text
    assert ("part-trained (a checkpoint, resumed in its turn): cnn-w24-d2-n60000-s0 (step "
            "4,000 of 13,594)") in text
    assert "3 queued" in text
    assert lab_view.progress_text({"done": ["a"], "training": [], "todo": []}) == \
        "All 1 grid runs have finished."


def test_progress_text_says_which_runs_train_again_and_why():
    status = {"done": [], "training": [("cnn-w24-d2-n60000-s0-a1", 100, 27188)], "todo": []}
    # its first attempt: 13,594 steps, validation 93.05% at the 80% mark, 94.30% at the end
    first = dict(_row("cnn", 60000, 0.942, train=0.965, steps=13594,
                      curve=[(10875, 0.9305, 0.95), (13594, 0.9430, 0.965)]), attempt=0)
    text = lab_view.progress_text(status, [first])
    assert ("CNN, 60,000 images, seed 0: 13,594 steps reached 94.2% test accuracy, "
            "but not converged (validation accuracy still rising: +1.2 points in the last 20% of "
            "steps), so it trains "
            "again from scratch with 27,188 steps") in text
    done = {**status, "done": ["cnn-w24-d2-n60000-s0"]}  # its last attempt is in the grid
    assert "Training longer" not in lab_view.progress_text(done, [first])
    assert "Training longer" not in lab_view.progress_text(status, [])


def test_live_message_says_the_budget_is_shorter_and_what_it_cost(monkeypatch):
    from explorer.lab import sweep
    monkeypatch.setattr(sweep, "read_choice", lambda path=None: {"vit": Hyper(floor=2.0)})
    result = SimpleNamespace(seconds=90.0, test_acc=0.65, train_acc=0.7, steps=600)
    text = lab_view.live_message(result, ROWS, LabRun("vit", 500, 0), LIVE_BUDGET)
    assert "cut to 600 steps; the grid trains this run for 6,000" in text  # its floor, 2×
    assert "reaches 70.00% (+5.0 points against the live run)" in text
    full = lab_view.live_message(result, ROWS, LabRun("vit", 500, 0), Budget())
    assert "The grid has 70.00% for this run." in full and "cut to" not in full


def test_lecture_notes_say_which_of_their_points_ended_unconverged():
    # ROWS all pass (flat curves, train 2 points above test). A ViT at 60,000 images whose
    # validation accuracy climbed 10 points between 80% and 100% of its steps, a scrambled
    # CNN whose train accuracy is below test, and a size-sweep point climbing as steep
    late = _row("vit", 60000, 0.90, curve=[(2400, 0.80, 0.9), (3000, 0.90, 0.92)])
    under = _row("cnn", 500, 0.70, variant="scrambled", train=0.69)
    short = dict(late, width=32, budget=0.25)
    rows = [r for r in ROWS if (r["arch"], r["train_images"], r["variant"]) not in
            {("vit", 60000, "original"), ("cnn", 500, "scrambled")}] + [late, under, short]
    expected = ("Not converged when the rule's last attempt ended, so these points may still "
                "move with longer training: ViT (absolute positions), 60,000 images, seed 0 "
                "(validation accuracy still rising: +10.0 points in the last 20% of steps); "
                "CNN, 500 images, seed 0, scrambled (train accuracy 1.0 points below test).")
    assert lab_view.lecture_note("lab-data", rows, superseded=[], sweep_left={}).endswith(
        expected)
    # step 9 compares the CoAtNet and the ViT on original images: the scrambled CNN is not
    # one of its points
    assert lab_view.lecture_note("lab-bias", rows, superseded=[], sweep_left={}).endswith(
        "move with longer training: ViT (absolute positions), 60,000 images, seed 0 "
        "(validation accuracy still rising: +10.0 points in the last 20% of steps).")
    assert "Not converged" not in lab_view.lecture_note("lab-data", ROWS)


def test_lecture_lab_steps_carry_the_grids_findings():
    assert "Lowest test error" in lab_view.lecture_note("lab-data", ROWS)
    assert "loses 12.0 points" in lab_view.lecture_note("lab-data", ROWS)
    assert lab_view.lecture_note("rollout", ROWS) == ""
    assert "No grid runs finished yet" in lab_view.lecture_note("lab-data", [])
    # a partial grid says so under every lab figure: ROWS are 6 of the grid's 83 runs (CNN
    # and ViT at 500 and 60,000 images, and both scrambled at 500; seed 0)
    for figure in ("lab-data", "lab-compute", "lab-bias"):
        assert lab_view.lecture_note(figure, ROWS, superseded=[], sweep_left={}).startswith(
            "\n\n**Trained here:** *(still training: 6 of the grid's 83 runs have finished; "
            "what is shown here comes from those alone)*")


def _old(row, lr=4e-3, shift=0, flip=False, weight_decay=0.05):
    return dict(row, lr=lr, shift=shift, flip=flip, weight_decay=weight_decay)


def test_a_sweep_stage_still_training_is_named_with_its_architectures():
    from explorer.lab import sweep
    left = {"sweep-floor": [(sweep.aug_run("vit_rel"), Hyper(lr=4e-3, floor=2.0)),
                            (sweep.aug_run("vit"), Hyper(lr=4e-3, floor=4.0))]}
    text = lab_view.sweep_text(left)
    assert text.startswith("**The sweep is choosing again:** its step-floor stage has 2 runs to "
                           "train (ViT (absolute positions), ViT + relative bias). The grid "
                           "waits for it;")
    status = {"done": [], "training": [], "todo": ["cnn-w24-d2-n500-s0"]}
    assert text in lab_view.progress_text(status, [], [], {}, left)
    assert lab_view.sweep_text({}) == "" and text not in lab_view.progress_text(
        status, [], [], {}, {})
    assert set(lab_view.STAGES) == set(grid.PHASES) - {"grid"}  # every stage has its name
    every = {"sweep-lr-full": [(sweep.aug_run(a), Hyper()) for a in ("coatnet", "vit", "cnn")]}
    assert "the sweep is choosing again for the CNN, the ViT (absolute positions) and the " \
           "CoAtNet (mini), whose runs may train again;" in lab_view.still_training(ROWS, [], every)
    later = {"sweep-wd": [(sweep.aug_run("cnn"), Hyper(lr=8e-3, weight_decay=0.25))],
             "sweep-lr-full": [(sweep.aug_run("coatnet"), Hyper(lr=1.6e-2))]}
    assert lab_view.sweep_text(later).startswith(
        "**The sweep is choosing again:** its weight-decay stage has 1 run to train (CNN); its "
        "full-budget learning-rate stage has 1 run to train (CoAtNet (mini)).")
    note = lab_view.lecture_note("lab-data", ROWS, superseded=[], sweep_left=left)
    assert note.startswith(
        "\n\n**Trained here:** *(still training: 6 of the grid's 83 runs have finished; the sweep "
        "is choosing again for the ViT (absolute positions) and the ViT + relative bias, whose "
        "runs may train again; what is shown here comes from those alone)*")


def test_a_new_choice_is_described_by_what_it_changed_since_the_last_one():
    # rows superseded twice: first without augmentation, then with it at the 3,000-step floor
    first, second = _old(_row("vit", 500, 0.65)), _old(_row("vit", 500, 0.77), shift=2, flip=True)
    text = lab_view.superseded_text([first, second], [], {"vit": Hyper(lr=4e-3, floor=2.0)})
    assert "ViT (absolute positions), 1 run (step floor 3,000 → 6,000). " in text
    both = lab_view.superseded_text([first], [], {"vit": Hyper(lr=2e-3, floor=2.0)})
    assert ("(learning rate 0.004 → 0.002; augmentation none → 2-px shifts, flips; step floor "
            "3,000 → 6,000)") in both


def test_the_runs_a_new_sweep_choice_trains_again_are_named_until_they_land():
    """The sweep changed the ViT's augmentation: its rows moved to superseded.csv (two runs,
    one of them with a retrained attempt), and the tab and the Lecture say why it is
    missing, with what changed, until its new rows land."""
    cnn = [r for r in ROWS if r["arch"] == "cnn"]
    old = [_old(_row("vit", 500, 0.65)), _old(_row("vit", 60000, 0.905)),
           _old(dict(_row("vit", 60000, 0.8977), attempt=1))]
    choice = {"vit": Hyper(lr=4e-3, shift=2, flip=True)}
    text = lab_view.superseded_text(old, [], choice)
    assert text == (
        "**Training again with the sweep's new choice:** ViT (absolute positions), 2 runs "
        "(augmentation none → 2-px shifts, flips). A "
        "re-run of the sweep (`explorer/lab/sweep.py`) changed these architectures' "
        "hyperparameters; their earlier rows are kept in `assets/lab/superseded.csv` and not "
        "plotted.")
    status = {"done": [grid.row_key(r) for r in cnn], "training": [],
              "todo": [grid.row_key(r) for r in old[:2]]}
    assert text in lab_view.progress_text(status, [], old, choice)
    assert "ViT (absolute positions), 1 run " in lab_view.superseded_text(
        old, [grid.row_key(old[0])], choice)  # its 500-image run has landed again
    assert lab_view.superseded_text(old, [grid.row_key(r) for r in old], choice) == ""
    note = lab_view.lecture_note("lab-data", cnn, superseded=old, sweep_left={})
    assert note.startswith(
        "\n\n**Trained here:** *(still training: 3 of the grid's 83 runs have finished; the "
        "ViT (absolute positions) trains again with the sweep's new hyperparameters; what is "
        "shown here comes from those alone)*")


def test_hyperparameters_say_their_augmentation_in_words():
    assert Hyper(shift=2, flip=True).augmentation() == "2-px shifts, flips"
    assert Hyper(shift=0, flip=False).augmentation() == "none"
    assert Hyper(shift=3, flip=False).augmentation() == "3-px shifts"
    row = dict(lr=2e-3, weight_decay=0.1, shift=0, flip=True)
    assert Hyper.of(row) == Hyper(2e-3, 0.1, 0, True) and Hyper.of(row).augmentation() == "flips"


def test_lecture_lab_steps_say_what_is_still_training_instead_of_failing(monkeypatch):
    from explorer.ui import lecture_tab

    def nothing_kept(*_a):
        raise FileNotFoundError("no model")

    monkeypatch.setattr(lab_view, "bias_tables", nothing_kept)
    monkeypatch.setattr(lab_view, "grid_rows", lambda: [])
    for step, what in ((7, "the grid is still training"), (8, "The ViT size sweep is still"),
                       (9, "The relative-attention model is still training")):
        plot = lecture_tab.step_view(step, "astronaut", 0, False)["plot"]
        assert what in str(plot.value), step


def test_the_summary_lists_the_attempts_that_trained_again():
    from explorer.lab.summary import summary_markdown
    first = dict(_row("vit", 60000, 0.9048, train=0.967, steps=13594,
                      curve=[(10875, 0.908, 0.95), (13594, 0.9135, 0.967)]), attempt=0, epochs=30.0)
    text = summary_markdown([], None, [first])
    assert "| vit w64 n60,000 s0 original | 1 | 13,594 | 30 | 90.48 | +0.55 | +6.2 | **no** |" \
        in text.splitlines()
    assert "Attempts that had not converged" not in summary_markdown([], None, [])


def test_the_summarys_convergence_table_marks_the_size_sweeps_budgets_as_fixed():
    from explorer.lab.summary import summary_markdown
    # the same climbing curve: a failure for a grid run, a fixed budget for a sweep point
    climbing = [(1200, 0.70, 0.75), (1500, 0.76, 0.77)]
    grid_run = dict(_row("vit", 20000, 0.76, steps=1500, curve=climbing), epochs=9.6, flops=1,
                    batch=128)
    short = dict(grid_run, width=32, budget=0.25)
    lines = summary_markdown([grid_run, short]).splitlines()
    assert "| vit w64 n20,000 s0 original | 1 | 1,500 | 9.6 | 76.00 | +6.00 | +2.0 | **no** |" \
        in lines
    assert ("| vit w32 n20,000 s0 original b0.25 | 1 | 1,500 | 9.6 | 76.00 | +6.00 | +2.0 "
            "| fixed budget |") in lines


def test_the_summary_gives_each_architectures_speed_and_the_grids_order():
    from explorer.lab.summary import summary_markdown
    # the CNN: 3,000 steps of 128 in 600 s and 300 s (two runs): 768,000 / 900 = 853/s; the
    # ViT: 3,000 steps in 60 s (`_row`'s) and a retrained attempt of 3,000 in 540 s:
    # 768,000 / 600 = 1,280/s
    cnn = [dict(_row("cnn", n, 0.8), seconds=s, batch=128, epochs=1.0, flops=1)
           for n, s in ((500, 600.0), (1200, 300.0))]
    vit = dict(_row("vit", 500, 0.7), batch=128, epochs=1.0, flops=1)
    retried = dict(vit, seconds=540.0, attempt=0)
    text = summary_markdown([vit] + cnn, None, [retried])
    assert ("By architecture (finished runs and attempts on a CPU, examples/s per worker): "
            "CNN 853, ViT (absolute positions) 1,280.") in text
    assert "3 runs, 0.27 hours of training summed over runs, 1,200 training" in text
    # a run trained on a GPU counts in the hours, said so, and in no CPU worker's speed
    gpu = dict(cnn[0], seconds=60.0, device="cuda")
    text = summary_markdown([vit, gpu, cnn[1]], None, [retried])
    assert ("3 runs, 0.12 hours of training summed over runs (1 of the runs trained partly "
            "or wholly on a GPU, 0.02 hours of it), 2,133 training examples/s") in text
    assert "CNN 1,280, ViT (absolute positions) 1,280." in text
    table = [line for line in text.splitlines() if line.startswith("| CNN |")
             or line.startswith("| ViT (absolute")]
    assert [line.split(" |")[0] for line in table] == ["| CNN", "| ViT (absolute positions)"]


def test_every_run_has_a_line_with_its_numbers_and_its_verdict():
    converged = _row("vit", 500, 0.70, train=0.99, curve=[(2400, 0.70, 0.99), (3000, 0.701, 0.99)])
    retried = dict(_row("cnn", 500, 0.80, curve=[(2400, 0.70, 0.8), (3000, 0.80, 0.8)]),
                   attempt=0)
    final = dict(_row("cnn", 500, 0.82, steps=6000, curve=[(4800, 0.82, 0.9), (6000, 0.82, 0.9)]),
                 attempt=1)
    for r in (converged, retried, final):
        r.update(epochs=r["steps"] * 128 / 450, val_acc=r["curve"][-1][1])
    lines = lab_view.runs_table([converged, final], [retried])
    assert [line[0] for line in lines] == ["cnn-w24-d2-n500-s0", "cnn-w24-d2-n500-s0-a1",
                                           "vit-w64-d4-n500-s0"]  # CNN first, attempts in order
    header = dict(zip(lab_view.RUN_HEADERS, lines[0], strict=True))
    assert header["late gain"] == 10.0 and header["converged"] == "no: trained again"
    assert header["test %"] == 80.0 and header["min"] == 1.0 and header["steps"] == 3000
    assert lines[1][-2:] == [0.0, "yes"]
    assert lines[2][-2:] == [0.1, "yes"]


def test_a_runs_curve_shows_the_line_the_rule_fitted_and_its_verdict():
    # evaluations at 2,400 (the 80% mark of 3,000 steps), 2,700 and 3,000: 0.80, 0.82, 0.81;
    # pairwise slopes 0.02/300, 0.01/600, −0.01/300: median 1/60,000 a step, so the line rises
    # +1.0 point over the 600 steps (not converged); intercept median(y − slope·x) = 0.76
    row = _row("vit", 500, 0.80, curve=[(1200, 0.6, 0.7), (2400, 0.80, 0.9), (2700, 0.82, 0.95),
                                         (3000, 0.81, 0.97)])
    fig = plots.run_curve_figure(row, lab_view.run_title(row))
    fitted = next(t for t in fig.data if t.name.startswith("fitted"))
    assert list(fitted.x) == [2400, 3000]
    assert list(fitted.y) == pytest.approx([80.0, 81.0])
    validation = next(t for t in fig.data if t.name == "validation")
    assert list(validation.y) == pytest.approx([60, 80, 82, 81])
    assert fig.layout.shapes[0].x0 == pytest.approx(2400) and fig.layout.shapes[0].x1 == 3000
    title = fig.layout.title.text
    assert "500 images, seed 0, 3,000 steps" in title
    assert "late gain +1.00 points" in title and "not converged" in title


def test_the_summary_lists_the_sweeps_stages_apart():
    from explorer.lab.summary import summary_markdown
    full = dict(arch="cnn", train_images=3000, val_images=300, steps=3000, lr=8e-3, shift=0,
                flip=False, weight_decay=0.05, val_acc=0.863, train_acc=1.0)
    quarter = dict(full, steps=750, shift=2, flip=True, val_acc=0.887, train_acc=0.96)
    wide = dict(full, train_images=5000, val_images=2000, val_acc=0.8704)
    decayed = dict(wide, weight_decay=0.25, val_acc=0.881)  # the weight-decay stage's
    text = summary_markdown([], [decayed, wide, full, quarter], None)
    lines = [line for line in text.splitlines() if line.startswith("| CNN")]
    assert lines == [
        "| CNN | 3,000 (300) | 750 | 0.008 | 0.05 | 2-px shifts, flips | 88.7 | 96.0 |",
        "| CNN | 3,000 (300) | 3,000 | 0.008 | 0.05 | none | 86.3 | 100.0 |",
        "| CNN | 5,000 (2,000) | 3,000 | 0.008 | 0.05 | none | 87.0 | 100.0 |",
        "| CNN | 5,000 (2,000) | 3,000 | 0.008 | 0.25 | none | 88.1 | 100.0 |"]


def _sweep_row(width, budget, acc, flops):
    # a size-sweep run: 1,000 steps of 100 images at ``budget``, ``flops`` per image forward
    return dict(_row("vit", 20000, acc), width=width, budget=budget, flops=flops,
                steps=int(1000 * budget), batch=100)


def test_scaling_lines_name_the_best_width_per_budget_in_readable_flops():
    # training FLOPs = 3 × forward × images seen: w32 (1e6/image) at 500 and 1,000 steps is
    # 1.5e11 and 3e11; w64 (4e6/image) is 6e11 and 1.2e12. Four budgets, log-spaced from
    # 1.5e11 to 1.2e12: 1.5e11, 3e11, 6e11, 1.2e12
    rows = [_sweep_row(32, 0.5, 0.80, 1e6), _sweep_row(32, 1.0, 0.84, 1e6),
            _sweep_row(64, 0.5, 0.82, 4e6), _sweep_row(64, 1.0, 0.88, 4e6)]
    (line,) = lab_view.scaling_lines(rows)
    # up to 6e11 the w32's 84% beats everything the w64 has reached within the budget (82%
    # at 6e11); at 1.2e12 the w64's 88% wins
    assert line == ("- 20,000 images, the best width within a budget of training FLOPs: "
                    "within 150G, 32; within 300G, 32; within 600G, 32; within 1.2T, 64 "
                    "(from 4 of the sweep's 12 runs so far)")
    fig = plots.scaling_figure(rows)
    assert list(fig.layout.xaxis.ticktext) == ["200G", "500G", "1T"]  # 1-2-5, whole labels


def test_the_frontier_counts_the_attempts_the_rule_trained_before_a_row():
    # the w64 grid run kept its 4× attempt (4,000 steps: 4.8e12 FLOPs); its 1× attempt
    # (1,000 steps: 1.2e12, 87%) is a finished run too. Budgets log-spaced from 1.5e11 to
    # 4.8e12, 32^(1/3) = 3.17× apart: 1.5e11, 4.76e11, 1.51e12, 4.8e12. Within 1.51e12 the
    # w32 has 84% (3e11) and the w64's half budget 82% (6e11), so without the attempt the
    # w32 is best there; with it the w64's 87% is
    rows = [_sweep_row(32, 0.5, 0.80, 1e6), _sweep_row(32, 1.0, 0.84, 1e6),
            _sweep_row(64, 0.5, 0.82, 4e6), dict(_sweep_row(64, 1.0, 0.90, 4e6), steps=4000,
                                                attempt=2)]
    attempts = [dict(_sweep_row(64, 1.0, 0.87, 4e6), attempt=0)]
    head = "- 20,000 images, the best width within a budget of training FLOPs: "
    (alone,) = lab_view.scaling_lines(rows)
    assert alone.startswith(head + "within 150G, 32; within 476G, 32; within 1.5T, 32; "
                                   "within 4.8T, 64")
    (line,) = lab_view.scaling_lines(rows, attempts)
    assert line.startswith(head + "within 150G, 32; within 476G, 32; within 1.5T, 64; "
                                  "within 4.8T, 64")
    fig = plots.scaling_figure(rows, attempts)
    w64 = next(t for t in fig.data if t.name and t.name.startswith("w64"))
    assert list(w64.x) == pytest.approx([6e11, 1.2e12, 4.8e12])


def test_scaling_lines_stop_saying_so_far_once_the_sweep_has_finished():
    # every width of the sweep (32, 48, 64, 96) at every budget (¼, ½, 1): 12 runs; one
    # missing brings the "so far" back. All at 80%, so the narrowest (the first to reach it)
    # is best everywhere; compute 3 × w² × steps × 100 runs from 3·32²·250·100 = 7.68e7 to
    # 3·96²·1000·100 = 2.76e9, four budgets 3.3× apart
    rows = [_sweep_row(w, b, 0.8, w * w) for w in (32, 48, 64, 96) for b in (0.25, 0.5, 1.0)]
    (line,) = lab_view.scaling_lines(rows)
    assert line == ("- 20,000 images, the best width within a budget of training FLOPs: "
                    "within 77M, 32; within 254M, 32; within 837M, 32; within 2.8G, 32")
    (line,) = lab_view.scaling_lines(rows[1:])
    assert line.endswith("(from 11 of the sweep's 12 runs so far)")


def test_the_seed_band_marks_no_points_of_its_own():
    # two seeds per size: the band spans them; only the mean line has markers (plotly's
    # default mode, for a trace of few points, would mark the band's four corners too)
    rows = [_row("cnn", 500, 0.8), _row("cnn", 500, 0.9, seed=1),
            _row("cnn", 3000, 0.9), _row("cnn", 3000, 0.92, seed=1)]
    fig = plots.data_figure(rows)
    marked = [t for t in fig.data if "markers" in (t.mode or "lines+markers")]
    assert [t.name for t in marked] == ["CNN"]
    assert list(marked[0].y) == pytest.approx([15.0, 9.0])
    (band,) = [t for t in fig.data if t.fill == "toself"]
    assert sorted(band.y) == pytest.approx([8.0, 10.0, 10.0, 20.0])


def test_the_runs_count_says_runs_and_attempts_and_so_far_only_while_training():
    from explorer.lab import grid
    attempt = dict(ROWS[1], attempt=0)
    assert lab_view.runs_count(ROWS, [attempt]) == \
        "6 finished runs and 1 retrained attempt so far"
    everything = [dict(arch=r.arch, train_images=r.train_images, seed=r.seed, width=r.width,
                       depth=r.depth, variant=r.variant, budget=r.budget, attempt=0)
                  for r in grid.grid_runs()]
    assert lab_view.runs_count(everything, []) == f"{len(everything)} finished runs"


def test_a_wrapped_title_leaves_room_for_the_size_sweeps_panel_title():
    # on a projector the title wraps to two lines; the panel's "20,000 images" sits just
    # above the plot, so the top margin grows past the default (70 px): it ran into it
    from explorer.plots.lecture import PRESENTER_FONT, for_projector
    rows = [_sweep_row(32, 0.5, 0.80, 1e6), _sweep_row(64, 1.0, 0.88, 4e6)]
    fig = for_projector(plots.scaling_figure(rows), presenter=True, fill=True)
    assert fig.layout.title.text.count("<br>") == 1
    title_lines = 2 * 1.3 * (PRESENTER_FONT + 2)
    panel_title = 1.3 * PRESENTER_FONT
    assert fig.layout.margin.t >= title_lines + panel_title + 40  # + plotly's title padding
    plain = for_projector(plots.scaling_figure(rows), presenter=False)
    assert plain.layout.margin.t == 70


def test_what_training_again_bought_is_each_attempts_test_accuracy():
    # the CNN on 60,000 images tested 94.20% at 13,594 steps, was trained again (validation
    # still rising) and kept at 27,188 steps with 94.17%: -0.03 points
    first = dict(_row("cnn", 60000, 0.9420, steps=13594), attempt=0)
    kept = dict(_row("cnn", 60000, 0.9417, steps=27188), attempt=1)
    rows = [kept, _row("vit", 500, 0.70)]
    assert lab_view.longer_text(rows, [first]) == (
        "**Trained again by the rule:** 1 finished run trained again from scratch with twice "
        "the steps (up to 4×) after an attempt that had not converged; the kept attempt tests "
        "-0.03 points against its first. The check stops a run on a flat validation curve; a "
        "longer run need not test better.\n\n<details><summary>Each retrained run's attempts "
        "(steps and test accuracy; the last is kept)</summary>\n\n- CNN, 60,000 images, seed 0: "
        "13,594 steps 94.20% → 27,188 steps 94.17%\n\n</details>")
    # its second seed, retrained twice (+0.30, then +0.10 more: +0.40), is a line of its own
    # that says which seed it is; a third run gains +2.00: the range is -0.03 to +2.00,
    # the median +0.40
    first_1 = dict(_row("cnn", 60000, 0.9400, steps=13594, seed=1), attempt=0)
    second_1 = dict(_row("cnn", 60000, 0.9430, steps=27188, seed=1), attempt=1)
    kept_1 = dict(_row("cnn", 60000, 0.9440, steps=54376, seed=1), attempt=2)
    vit_first = dict(_row("vit", 3000, 0.85, steps=6000), attempt=0)
    vit_kept = dict(_row("vit", 3000, 0.87, steps=12000), attempt=1)
    text = lab_view.longer_text(rows + [kept_1, vit_kept], [first, first_1, second_1, vit_first])
    assert text.startswith("**Trained again by the rule:** 3 finished runs trained again ")
    assert "the kept attempt tests -0.03 to +2.00 points against the first (median +0.40)." in text
    assert text.endswith(
        "- CNN, 60,000 images, seed 0: 13,594 steps 94.20% → 27,188 steps 94.17%\n"
        "- CNN, 60,000 images, seed 1: 13,594 steps 94.00% → 27,188 steps 94.30% → 54,376 steps "
        "94.40%\n- ViT (absolute positions), 3,000 images, seed 0: 6,000 steps 85.00% → 12,000 "
        "steps 87.00%\n\n</details>")
    # a run still training again is not here (the progress line says it), nor is one never
    # retrained
    assert lab_view.longer_text([_row("vit", 500, 0.70)], [first]) == ""


def test_the_intro_gives_each_architectures_recipe_from_the_sweeps_choice():
    choice = {"vit": Hyper(lr=4e-3, floor=2.0),
              "cnn": Hyper(lr=8e-3, weight_decay=0.01, shift=0, flip=False)}
    assert lab_view.recipe_text(choice).splitlines() == [
        "**Each architecture's recipe** (the sweep's choice, on validation images; "
        "`explorer/lab/sweep.py`):",
        "- CNN: peak learning rate 0.008, weight decay 0.01, augmentation none, at least "
        "3,000 steps",
        "- ViT (absolute positions): peak learning rate 0.004, weight decay 0.05, "
        "augmentation 2-px shifts, flips, at least 6,000 steps"]
    assert lab_view.recipe_text(choice) in lab_view.intro_text(choice=choice)
    assert lab_view.recipe_text({}) == "" and "recipe" not in lab_view.intro_text(choice={})
