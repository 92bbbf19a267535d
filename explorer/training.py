"""The one training loop core every trainer shares: the lab, the fine-tune engine, iGPT, and
the linear probes (`explorer.finetune.probe.train_linear_probe`: the fine-tune engine's linear
mode and the layer-wise probes).

What is common lives here, once: accelerate's device placement and mixed-precision rule,
AdamW and its schedule (`Recipe`: linear warm-up, cosine decay), gradient clipping, the
cancel rule, periodic checkpoint-and-resume and the per-step progress event. What differs
stays with each trainer: its data path (the lab's in-memory 28-px tensors, the fine-tune's
image sets, iGPT's token sequences) arrives as an iterable of batches and a loss function.

    loop = TrainLoop(model, Recipe(lr=1e-3, total_steps=1000), cancel=event,
                     checkpoint=Checkpointing(path, every_s=60))
    loop.resume()                       # continue from the checkpoint if there is one
    for event in loop.fit(batches_from(loop.step), loss_fn):
        ...                             # a `StepEvent` per optimiser step
    if loop.cancelled: ...

Cancel rule, the same for every caller: the event is checked before each optimiser step;
once set, no further step starts, a checkpoint is written when checkpointing is on (so a
cancelled run resumes where it stopped), ``loop.cancelled`` is True and `fit` returns.

Clock: a run's training seconds are the wall time of its steps (evaluation and checkpoints
between steps left out), less any time its process spent paused with ``kill -TSTP`` (until
``kill -CONT``) where the process asked for that (`pause_on_sigtstp`: the grid's workers), so
that pausing the grid for a benchmark leaves its rows' seconds true.

Resume rule: a checkpoint holds the model, the optimiser, the step, the training seconds and
the RNG states; a trainer whose batches are a pure function of (seed, step) — all three are —
gets the same weights from an interrupted-and-resumed run as from an uninterrupted one
(tested in `tests/test_training.py`).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from explorer import gpu

_paused = [0.0]  # seconds this process has spent paused by SIGTSTP (`pause_on_sigtstp`)


def pause_on_sigtstp() -> None:
    """Make ``kill -TSTP`` pause this process (until ``kill -CONT``) without the pause counting
    as training time: the handler stops the process (SIGSTOP, which it cannot catch) and,
    once continued, adds the time stopped to `paused_seconds`, which `TrainLoop.fit` takes
    out of the step it fell in. A plain SIGSTOP still pauses, and its time counts. For a
    process that only trains (the grid's workers); call it from the main thread."""
    def on_tstp(signum, frame):
        start = time.perf_counter()
        os.kill(os.getpid(), signal.SIGSTOP)
        _paused[0] += time.perf_counter() - start

    signal.signal(signal.SIGTSTP, on_tstp)


def paused_seconds() -> float:
    """Seconds this process has spent paused by SIGTSTP so far (`pause_on_sigtstp`)."""
    return _paused[0]


def make_accelerator(mixed_precision: str = "auto", grad_accum: int = 1) -> Accelerator:
    """accelerate's placement for a training run: CUDA when present, else the CPU; on a
    ZeroGPU Space CUDA inside a GPU call's worker (`explorer.gpu.stream_on_device`) and the
    CPU in the app's own process, where CUDA must not start (`gpu.cuda_off_limits`).

    accelerate keeps one mixed precision per process (its state is process-wide, and it
    refuses another): a run that asks for a precision other than the one this process
    already trains in gets the process's, with a warning, rather than an error in the
    middle of a room's session (e.g. a GPU Space whose first run was a bf16 fine-tune).
    """
    wanted = resolve_mixed_precision(mixed_precision)
    kwargs = {"gradient_accumulation_steps": grad_accum, "cpu": gpu.cuda_off_limits()}
    try:
        return Accelerator(mixed_precision=wanted, **kwargs)
    except ValueError as err:
        if "mixed_precision" not in str(err):
            raise
    accelerator = Accelerator(mixed_precision=None, **kwargs)  # the process's precision
    warnings.warn(f"This process already trains with mixed precision "
                  f"{accelerator.mixed_precision!r} (accelerate allows one per process); "
                  f"this run, which asked for {wanted!r}, trains with it too", stacklevel=2)
    return accelerator


def resolve_mixed_precision(choice: str) -> str:
    """accelerate's mixed_precision for ``choice``; "auto" never picks half precision on CPU
    (bf16/fp16 matmuls there are far slower than fp32), bf16 on GPUs that support it."""
    if choice != "auto":
        return choice
    if not torch.cuda.is_available() or gpu.cuda_off_limits():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def warmup_steps(total_steps: int, warmup_frac: float) -> int:
    """Linear warm-up steps for a run of ``total_steps``: its ``warmup_frac`` share, rounded,
    at least one when the share is not zero (the lab and fine-tuning both use this)."""
    return max(1, round(total_steps * warmup_frac)) if warmup_frac > 0 else 0


@dataclass(frozen=True)
class Recipe:
    """AdamW and its learning-rate schedule, in optimiser steps.

    Attributes:
        lr: peak learning rate.
        total_steps: where the cosine reaches its floor (``min_lr_frac`` × lr).
        weight_decay: AdamW's decoupled weight decay.
        warmup_steps: linear warm-up from lr / warmup_steps to lr.
        min_lr_frac: the cosine's floor as a share of lr (0: decays to zero, as DeiT/timm).
        betas: AdamW's betas (nanoGPT/iGPT use 0.95 for the second).
        grad_clip: clip the gradient norm to this (0: no clipping).
        decay_norms_and_biases: False exempts 1-D parameters (norms, biases) from weight
            decay, as nanoGPT does.
    """

    lr: float
    total_steps: int
    weight_decay: float = 0.05
    warmup_steps: int = 0
    min_lr_frac: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 0.0
    decay_norms_and_biases: bool = True

    def factor(self, step: int, progress: float | None = None) -> float:
        """The multiplier of ``lr`` for optimiser step ``step`` (0-based): linear warm-up,
        then cosine decay to ``min_lr_frac``. ``progress`` (0–1) overrides how far the decay
        is (iGPT's time-budgeted runs); by default it is the step's share of the steps after
        warm-up."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if progress is None:
            progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))
        return self.min_lr_frac + (1.0 - self.min_lr_frac) * cosine

    def optimizer(self, model: nn.Module) -> torch.optim.AdamW:
        """AdamW over ``model``'s trainable parameters."""
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if self.decay_norms_and_biases:
            groups = [{"params": [p for _, p in params], "weight_decay": self.weight_decay}]
        else:
            groups = [{"params": [p for _, p in params if p.dim() >= 2],
                       "weight_decay": self.weight_decay},
                      {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)


@dataclass
class StepEvent:
    """One optimiser step done.

    Attributes:
        step: optimiser steps done so far (1-based after the first).
        total: the recipe's ``total_steps``.
        loss: this step's loss (the mean over its accumulated batches).
        lr: the learning rate the step used.
        seconds: training seconds so far (resumed runs include the earlier ones).
        stats: what the trainer's loss function returned beside the loss (summed over
            accumulated batches).
    """

    step: int
    total: int
    loss: float
    lr: float
    seconds: float
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often a loop saves itself: every ``every_s`` training seconds, every
    ``every_steps`` steps (0: off), and on cancel."""

    path: Path
    every_s: float = 0.0
    every_steps: int = 0


LossFn = Callable[[nn.Module, object], "tuple[torch.Tensor, dict] | torch.Tensor"]


class TrainLoop:
    """A model, its optimiser and schedule, placed by accelerate; `fit` runs the steps.

    Args:
        model: the module to train (its trainable parameters go to AdamW).
        recipe: optimiser and schedule.
        mixed_precision: "auto" (`resolve_mixed_precision`) or accelerate's choices.
        grad_accum: batches per optimiser step.
        cancel: stops the loop before the next step when set.
        checkpoint: periodic checkpointing (None: off).
        extra_state: called at each checkpoint; what it returns is saved beside the weights
            and handed back by `resume` (a trainer's own bookkeeping: curves, configs).
        accelerator: an existing Accelerator (its state is process-wide); None builds one.
        compile: train through ``torch.compile(model)`` (CPU: fused C++ kernels); if the
            first compiled step fails (no compiler on the machine), the loop warns and goes
            on eagerly. Evaluation by the caller stays eager on the same weights.
    """

    def __init__(self, model: nn.Module, recipe: Recipe, *, mixed_precision: str = "auto",
                 grad_accum: int = 1, cancel: threading.Event | None = None,
                 checkpoint: Checkpointing | None = None,
                 extra_state: Callable[[], dict] | None = None,
                 accelerator: Accelerator | None = None, compile: bool = False):
        self.recipe = recipe
        self.accelerator = accelerator or make_accelerator(mixed_precision, grad_accum)
        self.cancel = cancel or threading.Event()
        self.checkpointing = checkpoint
        self.extra_state = extra_state
        self.optimizer = recipe.optimizer(model)
        self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        self.forward = torch.compile(self.model) if compile else self.model
        self.step = 0
        self.seconds = 0.0
        self.cancelled = False
        self.resumed_extra: dict = {}

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def lr_at(self, step: int, progress: float | None = None) -> float:
        return self.recipe.lr * self.recipe.factor(step, progress)

    # -- checkpoints --------------------------------------------------------------------

    def state(self) -> dict:
        return {"model": self.unwrapped.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "seconds": self.seconds, "recipe": asdict(self.recipe),
                "rng": torch.get_rng_state(),
                "extra": self.extra_state() if self.extra_state else {}}

    def save(self, path: Path | None = None) -> Path | None:
        """Write the checkpoint atomically (main process only); its path."""
        path = Path(path or self.checkpointing.path)
        if not self.accelerator.is_main_process:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        torch.save(self.state(), tmp)
        os.replace(tmp, path)
        return path

    def resume(self, path: Path | None = None) -> bool:
        """Load the checkpoint at ``path`` (default: the checkpointing path) if it exists;
        True when it did. The trainer's own state is then in ``resumed_extra``."""
        path = path or (self.checkpointing.path if self.checkpointing else None)
        if path is None or not Path(path).is_file():
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.unwrapped.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.seconds = int(state["step"]), float(state["seconds"])
        torch.set_rng_state(state["rng"])
        self.resumed_extra = state.get("extra", {})
        return True

    # -- the loop -----------------------------------------------------------------------

    def fit(self, batches: Iterable, loss_fn: LossFn, *, until: int | None = None,
            progress: Callable[[int, float], float] | None = None) -> Iterator[StepEvent]:
        """Train on ``batches`` until ``until`` optimiser steps are done (default: the
        recipe's ``total_steps``), the batches run out, or cancel is set.

        Args:
            batches: what ``loss_fn`` takes, one per forward (``grad_accum`` per step).
            loss_fn: ``(model, batch) -> loss`` or ``(loss, stats)``; stats are numbers.
            progress: ``(step, seconds) -> fraction`` of the decay done, for schedules that
                end on a time budget; it also ends the loop when it reaches 1.
        """
        until = self.recipe.total_steps if until is None else until
        accelerator, model, optimizer = self.accelerator, self.model, self.optimizer
        model.train()
        last_save, loss_sum, stats_sum, n = self.seconds, 0.0, {}, 0
        batches = iter(batches)
        while self.step < until and (progress is None or progress(self.step, self.seconds) < 1):
            if self.cancel.is_set():
                self.cancelled = True
                if self.checkpointing is not None:
                    self.save()
                return
            start, paused = time.perf_counter(), paused_seconds()
            try:
                batch = next(batches)
            except StopIteration:
                return
            lr = self.lr_at(self.step, progress(self.step, self.seconds) if progress else None)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with accelerator.accumulate(model):
                out = self._loss(loss_fn, batch)
                loss, stats = out if isinstance(out, tuple) else (out, {})
                accelerator.backward(loss)
                if self.recipe.grad_clip and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), self.recipe.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum, n = loss_sum + float(loss.detach()), n + 1
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0) + v
            self.seconds += time.perf_counter() - start - (paused_seconds() - paused)
            if not accelerator.sync_gradients:
                continue
            self.step += 1
            event = StepEvent(self.step, until, loss_sum / n, lr, self.seconds, stats_sum)
            loss_sum, stats_sum, n = 0.0, {}, 0
            yield event
            # after the trainer has handled the event (e.g. evaluated), so its extra state
            # in the checkpoint is that of this step
            if self._checkpoint_due(last_save):
                self.save()
                last_save = self.seconds

    def _loss(self, loss_fn: LossFn, batch):
        if self.forward is self.model:
            return loss_fn(self.model, batch)
        try:
            return loss_fn(self.forward, batch)
        except Exception as err:  # e.g. inductor finds no C++ compiler: train eagerly
            warnings.warn(f"torch.compile failed ({type(err).__name__}: {err}); training "
                          "eagerly", stacklevel=2)
            self.forward = self.model
            self.optimizer.zero_grad(set_to_none=True)
            return loss_fn(self.model, batch)

    def _checkpoint_due(self, last_save: float) -> bool:
        c = self.checkpointing
        if c is None:
            return False
        return bool((c.every_steps and self.step % c.every_steps == 0)
                    or (c.every_s and self.seconds - last_save >= c.every_s))
