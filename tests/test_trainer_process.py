"""explorer.trainer_process: the lab's live run trains in a child process of its own, with the
same events and the same model as in the app's process, its own heap policy, the caller's
cancel, and every way it can end (finished, stopped, raised, killed, abandoned) handled."""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from explorer import datasets, settings, trainer_process
from explorer.lab.engine import Budget, Hyper, LabRun, run_lab
from tests.process_helpers import trainers

pytestmark = pytest.mark.skipif(not datasets.FASHION_MNIST_DIR.is_dir(),
                                reason="needs Debian's dataset-fashion-mnist")

TINY = Budget(min_steps=8, epochs=0, batch=16, evals=2, test_images=200)
RUN, HYPER = LabRun("cnn", 60, 0), Hyper(lr=2e-3)


def minor_faults(pid: int) -> int:
    """A process's minor page faults so far (/proc/PID/stat, field 10: after the command's
    parenthesised name, the 8th field)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def test_a_run_in_its_own_process_trains_the_same_model_and_leaves_no_process():
    here = list(run_lab(RUN, TINY, HYPER, log_every=2))
    there, children = [], []
    for event in trainer_process.stream(run_lab, RUN, TINY, HYPER, log_every=2,
                                        cancel=threading.Event()):
        children.append(trainers())
        there.append(event)
    assert any(children)  # it ran in a child
    assert trainers() == []  # which has exited
    assert [(e.step, e.loss, e.val_acc) for e in there] == [(e.step, e.loss, e.val_acc)
                                                            for e in here]
    a, b = here[-1].result, there[-1].result
    assert (a.test_acc, a.curve, a.steps) == (b.test_acc, b.curve, b.steps)
    mine, theirs = a.model.state_dict(), b.model.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)  # same seed, same threads


def test_the_child_keeps_the_memory_its_steps_free():
    # BENCHMARKS.md "Session 20": the CNN at batch 128 faults ~18,900 pages a step with
    # glibc's default heap, ~2,000 with `tuning.keep_freed_memory`; 6,000 lies between
    budget = Budget(min_steps=60, epochs=0, batch=128, evals=1, test_images=200)
    seen = {}
    for event in trainer_process.stream(run_lab, LabRun("cnn", 3000, 0), budget, HYPER,
                                        log_every=10, cancel=threading.Event()):
        if event.step in (20, 50) and trainers():
            seen[event.step] = minor_faults(trainers()[0])
    assert seen.keys() == {20, 50}
    assert (seen[50] - seen[20]) / 30 < 6000


def test_cancel_stops_the_child_at_a_step():
    cancel = threading.Event()
    events = []
    budget = replace(TINY, min_steps=400)
    for event in trainer_process.stream(run_lab, RUN, budget, HYPER, log_every=2,
                                        cancel=cancel):
        events.append(event)
        cancel.set()
    assert events and events[-1].result is None  # stopped: no result
    assert events[-1].step < 400
    assert trainers() == []


def test_an_error_in_the_run_reaches_the_app_with_its_message():
    with pytest.raises(ValueError) as here:
        list(run_lab(LabRun("cnn", 10**6, 0), TINY, HYPER))
    with pytest.raises(ValueError) as there:
        list(trainer_process.stream(run_lab, LabRun("cnn", 10**6, 0), TINY, HYPER,
                                    cancel=threading.Event()))
    assert str(there.value) == str(here.value)
    assert "Raised in the training process" in "".join(there.value.__notes__)
    assert trainers() == []


def test_a_killed_trainer_ends_in_a_message_and_the_next_run_trains():
    stream = trainer_process.stream(run_lab, RUN, replace(TINY, min_steps=400), HYPER,
                                    log_every=2, cancel=threading.Event())
    next(stream)
    os.kill(trainers()[0], signal.SIGKILL)  # as the kernel's out-of-memory killer does
    with pytest.raises(trainer_process.TrainerDied, match="ran out of memory") as died:
        list(stream)
    assert f"code {-signal.SIGKILL}" in str(died.value)
    assert trainers() == []
    events = list(trainer_process.stream(run_lab, RUN, TINY, HYPER, cancel=threading.Event()))
    assert events[-1].result is not None


def test_an_abandoned_stream_stops_its_child():
    stream = trainer_process.stream(run_lab, RUN, replace(TINY, min_steps=400), HYPER,
                                    log_every=2, cancel=threading.Event())
    next(stream)
    assert len(trainers()) == 1
    stream.close()  # a visitor left: gradio closes the event's generator
    assert trainers() == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the run stays in the app")
@pytest.mark.parametrize("in_child", [True, False])
def test_the_live_run_trains_in_a_child_unless_the_settings_say_otherwise(monkeypatch,
                                                                         in_child):
    monkeypatch.setattr(settings, "_current",
                        replace(settings.current(), train_in_child=in_child))
    seen, events = [], []
    for event in trainer_process.stream_training(run_lab, RUN, TINY, HYPER, log_every=2,
                                                 cancel=threading.Event(), seconds=10):
        seen.append(len(trainers()))
        events.append(event)
    assert events[-1].result is not None
    assert set(seen) == ({1} if in_child else {0})


def test_a_trainer_whose_app_dies_stops_and_leaves_no_orphan():
    """The app killed mid-run (a Space restarting): its end of the pipe closes, and the
    trainer stops at its next step instead of training on, unseen, for hours."""
    import subprocess
    import sys
    import time

    app = subprocess.run([sys.executable, "-c", """
import os, threading
from explorer import trainer_process
from explorer.lab.engine import Budget, Hyper, LabRun, run_lab
from tests.process_helpers import trainers
budget = Budget(min_steps=100_000, epochs=0, batch=16, evals=2, test_images=200)
stream = trainer_process.stream(run_lab, LabRun("cnn", 60, 0), budget, Hyper(lr=2e-3),
                                log_every=2, cancel=threading.Event())
next(stream)
print(trainers()[0], flush=True)
os._exit(0)  # no cleanup: as a killed app
"""], capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    pid = int(app.stdout.split()[-1])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            state = (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0])
        except OSError:
            return  # gone
        if state == "Z":
            return  # ended, waiting for init to reap it
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("the trainer kept training after its app had gone")
