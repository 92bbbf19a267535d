"""The loop core every trainer shares: schedule values derived by hand, AdamW groups, resume
equal to an uninterrupted run, one cancel rule for the lab, the fine-tune engine and the
linear probe, and one mixed precision per process."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from explorer.training import Checkpointing, Recipe, TrainLoop, warmup_steps


def test_recipe_warms_up_linearly_then_follows_the_cosine_to_its_floor():
    r = Recipe(lr=1.0, total_steps=110, warmup_steps=10)
    assert r.factor(0) == pytest.approx(0.1) and r.factor(9) == pytest.approx(1.0)
    assert r.factor(10) == pytest.approx(1.0)  # the cosine starts at its top
    assert r.factor(60) == pytest.approx(0.5)  # halfway through the 100 decay steps
    assert r.factor(110) == pytest.approx(0.0) and r.factor(500) == pytest.approx(0.0)
    floor = Recipe(lr=1.0, total_steps=110, warmup_steps=10, min_lr_frac=0.1)
    assert floor.factor(60) == pytest.approx(0.55) and floor.factor(110) == pytest.approx(0.1)
    assert floor.factor(20, progress=1.0) == pytest.approx(0.1)  # a time budget ran out


def test_warmup_is_the_rounded_share_and_at_least_one_step_when_asked():
    # the lab's budget rule: 5% of 3,000 steps and of the 60,000-image run's 13,594
    assert warmup_steps(3000, 0.05) == 150 and warmup_steps(13594, 0.05) == 680
    assert warmup_steps(10, 0.05) == 1  # 0.5 rounds to 0: one step, not none
    assert warmup_steps(10, 0.0) == 0


def test_optimizer_exempts_norms_and_biases_only_when_asked():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    (one,) = Recipe(lr=1e-3, total_steps=1, weight_decay=0.1).optimizer(model).param_groups
    assert len(one["params"]) == 4 and one["weight_decay"] == 0.1
    decay, no_decay = Recipe(lr=1e-3, total_steps=1, weight_decay=0.1,
                             decay_norms_and_biases=False).optimizer(model).param_groups
    assert [p.dim() for p in decay["params"]] == [2] and no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) == 3


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)  # batches a pure function of the step
    x = torch.randn(8, 5, generator=g)
    return x, (x.sum(1) > 0).long()


def _loop(tmp_path=None, cancel=None, every_steps=0) -> TrainLoop:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.GELU(), nn.Linear(16, 2))
    ckpt = Checkpointing(tmp_path / "c.pt", every_steps=every_steps) if tmp_path else None
    return TrainLoop(model, Recipe(lr=1e-2, total_steps=20, warmup_steps=3, grad_clip=1.0),
                     cancel=cancel, checkpoint=ckpt)


def _batches(loop):
    step = loop.step
    while True:
        yield _data(step)
        step += 1


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def test_a_resumed_loop_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    whole = _loop()
    lrs = [e.lr for e in whole.fit(_batches(whole), _loss)]
    assert whole.step == 20 and lrs[0] == pytest.approx(1e-2 / 3)

    first = _loop(tmp_path, every_steps=7)
    for event in first.fit(_batches(first), _loss):
        if event.step == 9:
            break  # the process dies after step 9; the last checkpoint is step 7's
    second = _loop(tmp_path)
    assert second.resume() and second.step == 7
    rest = [e.lr for e in second.fit(_batches(second), _loss)]
    assert rest == lrs[7:]
    for p, q in zip(whole.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_cancel_stops_before_the_next_step_and_saves(tmp_path):
    cancel = threading.Event()
    loop = _loop(tmp_path, cancel=cancel)
    for event in loop.fit(_batches(loop), _loss):
        if event.step == 4:
            cancel.set()
    assert loop.cancelled and loop.step == 4
    assert torch.load(tmp_path / "c.pt", weights_only=False)["step"] == 4


@pytest.mark.skipif(not __import__("explorer.datasets").datasets.FASHION_MNIST_DIR.is_dir(),
                    reason="needs Debian's dataset-fashion-mnist")
def test_the_lab_the_fine_tune_engine_and_the_probe_cancel_the_same_way(tmp_path):
    """Set before the first step: no step runs, the caller says it was cancelled."""
    from explorer import datasets
    from explorer.finetune.engine import FinetuneConfig, run_finetune
    from explorer.finetune.probe import train_linear_probe
    from explorer.lab.engine import Budget, LabRun, run_lab
    from tests.test_finetune import tiny_vit

    cancel = threading.Event()
    cancel.set()
    budget = Budget(min_steps=5, epochs=1, batch=8, evals=1, test_images=50)
    ckpt = tmp_path / "lab.pt"
    assert list(run_lab(LabRun("cnn", 50, 0), budget, cancel=cancel, checkpoint=ckpt)) == []
    assert torch.load(ckpt, weights_only=False)["step"] == 0  # resumable from where it stopped

    data = datasets.fashion_mnist("train", 20, seed=0)
    events = list(run_finetune(tiny_vit(), data, data,
                               FinetuneConfig(mode="full", epochs=1, batch_size=4), cancel))
    assert [e.stage for e in events] == ["cancelled"] and events[-1].result.cancelled
    assert not any("loss" in h for h in events[-1].result.history)

    probe = train_linear_probe(torch.randn(6, 3), torch.tensor([0, 1] * 3), 2, cancel=cancel)
    with pytest.raises(StopIteration) as stop:  # no step yielded, no probe returned
        next(probe)
    assert stop.value.value is None


def test_a_compile_that_fails_falls_back_to_eager_with_the_same_result(monkeypatch):
    eager = _loop()
    list(eager.fit(_batches(eager), _loss))

    def broken(model):
        def forward(*_a, **_k):
            raise RuntimeError("no C++ compiler")
        return forward

    monkeypatch.setattr(torch, "compile", broken)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.GELU(), nn.Linear(16, 2))
    loop = TrainLoop(model, Recipe(lr=1e-2, total_steps=20, warmup_steps=3, grad_clip=1.0),
                     compile=True)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        list(loop.fit(_batches(loop), _loss))
    assert loop.forward is loop.model and loop.step == 20
    for p, q in zip(eager.model.parameters(), loop.model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate's state is process-wide: start and leave it uninitialised."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("first, then", [("bf16", "no"), ("no", "bf16")])
def test_a_run_asking_for_another_precision_trains_in_the_processs(first, then,
                                                                  fresh_accelerate_state):
    """A GPU Space whose first run was a bf16 fine-tune, then a run that asks for fp32 (or
    the other way round): accelerate refuses a second precision in one process; the run
    trains in the process's, with a warning, instead of failing in front of a room."""
    from accelerate import Accelerator

    from explorer.training import make_accelerator

    assert Accelerator(cpu=True, mixed_precision=first).mixed_precision == first
    with pytest.raises(ValueError, match="already been initialized"):
        Accelerator(cpu=True, mixed_precision=then)  # what accelerate itself does
    with pytest.warns(UserWarning, match=f"already trains with mixed precision '{first}'"):
        accelerator = make_accelerator(then)
    assert accelerator.mixed_precision == first
    torch.manual_seed(0)
    loop = TrainLoop(nn.Sequential(nn.Linear(5, 16), nn.GELU(), nn.Linear(16, 2)),
                     Recipe(lr=1e-2, total_steps=3), accelerator=accelerator)
    assert [e.step for e in loop.fit(_batches(loop), _loss)] == [1, 2, 3]


def test_a_process_trains_in_the_precision_it_asks_for_first(fresh_accelerate_state):
    import warnings

    from explorer.training import make_accelerator

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no warning
        assert make_accelerator("bf16").mixed_precision == "bf16"
        assert make_accelerator("bf16").mixed_precision == "bf16"


PAUSED_RUN = """
import sys, time, torch
from torch import nn
from explorer.training import Recipe, TrainLoop, pause_on_sigtstp
if sys.argv[1] == "tstp":
    pause_on_sigtstp()
loop = TrainLoop(nn.Linear(2, 1), Recipe(lr=1e-3, total_steps=400))
def batches():  # >= 10 ms a step: >= 4 s of training
    while True:
        time.sleep(0.01)
        yield torch.zeros(4, 2)
print("training", flush=True)
start = time.perf_counter()
for _ in loop.fit(batches(), lambda m, b: m(b).pow(2).mean()):
    pass
print(time.perf_counter() - start, loop.seconds, flush=True)
"""


@pytest.mark.parametrize("mode, sig, paused", [("tstp", signal.SIGTSTP, True),
                                               ("plain", signal.SIGSTOP, False)])
def test_time_paused_with_sigtstp_is_not_training_time(mode, sig, paused):
    """A grid worker paused with ``kill -TSTP`` for 2 s: its training seconds are the run's
    wall time less those 2 s (and the little spent between steps); a plain SIGSTOP's 2 s
    still count, as they did before the worker asked for the pause rule."""
    child = subprocess.Popen([sys.executable, "-c", PAUSED_RUN, mode], stdout=subprocess.PIPE,
                             text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert child.stdout.readline().strip() == "training"
        time.sleep(0.5)
        child.send_signal(sig)
        time.sleep(2.0)
        child.send_signal(signal.SIGCONT)
        wall, seconds = map(float, child.stdout.readline().split())
        assert child.wait(timeout=60) == 0
    finally:
        child.kill()
    assert wall > 5.5  # the pause fell inside the run
    if paused:
        assert 1.9 <= wall - seconds <= 2.6
    else:
        assert wall - seconds < 0.5
