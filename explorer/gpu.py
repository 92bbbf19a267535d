"""ZeroGPU, Hugging Face's shared GPUs for Spaces: `spaces.GPU` there, nothing anywhere else.

On a ZeroGPU Space (its environment sets ``SPACES_ZERO_GPU``) a function that uses CUDA must
carry ``@spaces.GPU``: each call borrows a GPU for at most ``duration`` seconds, counted
against the visitor's quota, and runs in a worker process forked from the app. Its arguments
and its result are pickled across that process boundary, so the result must hold no CUDA
tensor (`to_cpu`), and whatever the call caches stays in the worker. `gpu_task` applies
``spaces.GPU`` there and moves results (or each streamed item) to the CPU; everywhere else
(a CPU Space, a dedicated GPU, a laptop) it returns the function itself, untouched, and
``spaces`` is never imported.

Whether this is a ZeroGPU Space is read when a function is decorated (at import), as the
``spaces`` package itself does: its decorator must run before the app starts serving.

Training borrows a GPU the same way, streamed: `stream_on_device` runs a training generator
(the fine-tune engine, the layer-wise probes, the lab's live run) in the worker and relays
its events, and `training_seconds` sizes the call.

An exception raised in the worker reaches the app as itself, with its message: spaces would
replace it with a generic "ZeroGPU worker error" (`_Raised`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import math
import os
import pickle
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def on_zero_gpu() -> bool:
    """Whether this process runs on a ZeroGPU Space (as ``spaces.config`` decides it)."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


# GPU calls running in this process: above zero only inside a ZeroGPU worker (`gpu_task`
# wraps the call), the one place on a ZeroGPU Space where CUDA may start.
_gpu_calls = 0


@contextlib.contextmanager
def _inside_gpu_call() -> Iterator[None]:
    global _gpu_calls
    _gpu_calls += 1
    try:
        yield
    finally:
        _gpu_calls -= 1


def in_gpu_call() -> bool:
    """Whether this code runs inside a ZeroGPU call (in its worker process)."""
    return _gpu_calls > 0


def cuda_off_limits() -> bool:
    """Whether CUDA must not start here: in a ZeroGPU Space's own process, outside its GPU
    calls (``spaces`` makes ``torch.cuda.is_available()`` say True there all the same)."""
    return on_zero_gpu() and not in_gpu_call()


def to_device(value: Any, device: torch.device | str) -> Any:
    """`value` with every tensor inside it (tuples, lists, dicts, dataclasses) on ``device``,
    and every module moved there in place (see `_plain_module`); tensors already there and
    everything else are returned as they are."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, torch.nn.Module):
        return _plain_module(value).to(device)
    if isinstance(value, (list, tuple)):
        items = [to_device(v, device) for v in value]
        if all(a is b for a, b in zip(items, value, strict=True)):
            return value
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: to_device(getattr(value, f.name), device)
                   for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    return value


def _plain_module(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` without accelerate's mixed-precision wrapper: a model trained under bf16
    keeps the autocast ``forward`` `Accelerator.prepare` gave it, which would run the app's
    CPU copy under CUDA's autocast settings instead of as the plain fp32 module it is."""
    if "_original_forward" not in vars(module):
        return module
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(module, keep_fp32_wrapper=False)


def to_cpu(value: Any) -> Any:
    """`to_device` the CPU: what may cross ZeroGPU's process boundary (a trained model as a
    plain CPU module)."""
    return to_device(value, "cpu")


def gpu_task(duration: float | Callable[..., float] = 60) -> Callable[[F], F]:
    """Decorator: ``spaces.GPU(duration=duration)`` on a ZeroGPU Space, results on the CPU and
    exceptions as the worker raised them (`_Raised`); elsewhere the function itself.

    Args:
        duration: the longest the call may hold the GPU, in seconds, or a function of the
            call's arguments giving it. ZeroGPU checks the visitor's remaining quota against
            it before the call and queues shorter requests first, so size it to the call.
    """

    def decorate(fn: F) -> F:
        if not on_zero_gpu():
            return fn
        import spaces  # installed on every ZeroGPU Space (and listed in requirements.txt)

        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def in_worker(*args, **kwargs):
                with _inside_gpu_call():
                    try:
                        for item in fn(*args, **kwargs):
                            yield to_cpu(item)
                    except Exception as err:
                        yield _raised(err)

            on_gpu = spaces.GPU(duration=duration)(in_worker)

            @functools.wraps(on_gpu)
            def in_app(*args, **kwargs):
                for item in on_gpu(*args, **kwargs):
                    if isinstance(item, _Raised):
                        raise item.error
                    yield item
        else:
            @functools.wraps(fn)
            def in_worker(*args, **kwargs):
                with _inside_gpu_call():
                    try:
                        return to_cpu(fn(*args, **kwargs))
                    except Exception as err:
                        return _raised(err)

            on_gpu = spaces.GPU(duration=duration)(in_worker)

            @functools.wraps(on_gpu)
            def in_app(*args, **kwargs):
                result = on_gpu(*args, **kwargs)
                if isinstance(result, _Raised):
                    raise result.error
                return result
        return in_app

    return decorate


# -- errors from the worker ------------------------------------------------------------------
# spaces sends a `gr.Error` raised in the worker back as it is, but replaces every other
# exception with ``gr.Error(<its class name>, title="ZeroGPU worker error")`` (``exception_result``
# in spaces/zero/wrappers.py): the message a tab shows for a visitor's mistake (an unreadable
# image, unusable data, CUDA out of memory: `explorer.ui.common.user_errors`) would be lost. So
# the worker catches it and sends it back as a value (`_Raised`), and the app raises it again:
# the tabs see the same error as off ZeroGPU (and no gradio is needed here to say so).


@dataclasses.dataclass
class _Raised:
    """An exception raised in the worker, crossing back as a call's result (or last item)."""

    error: Exception


def _raised(err: Exception) -> _Raised:
    return _Raised(crossing_error(err, "the ZeroGPU worker"))


def crossing_error(err: BaseException, where: str) -> BaseException:
    """``err``, raised in another process (``where``), ready to cross back by pickling: with
    that process's traceback as a note (for the app's log, where a bug is logged); one that
    would not survive pickling as a RuntimeError with its class and message."""
    note = f"Raised in {where}:\n" + "".join(traceback.format_exception(err))
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:  # e.g. an __init__ that takes other arguments than ``args``
        err = RuntimeError(f"{type(err).__name__}: {err}")
    err.add_note(note)
    return err


# A ViT analysis on ZeroGPU: the app keeps its models on the CPU (CUDA must not start in the
# main process there, `explorer.models.default_device`); each analysis call borrows a GPU
# and runs in a worker process, where the model (handed over in shared memory, as torch's
# multiprocessing pickles CPU tensors) is moved to the GPU, and only CPU tensors come back.
# Sized for one forward pass and its captures on ViT-S/B at up to 518 px, plus the worker's
# start and the model's copy to the GPU: seconds, not the 60 s default (ZeroGPU checks a
# visitor's quota against it before the call).
ANALYSIS_SECONDS = 20


def _analyse_on_device(fn: Callable[..., Any], model: torch.nn.Module, *args, **kwargs) -> Any:
    """``fn(model, *args, **kwargs)``; in a ZeroGPU worker, with the model and the tensors
    among the arguments moved to its GPU first (the worker's copy: the app's stays put)."""
    if in_gpu_call() and torch.cuda.is_available():
        device = torch.device("cuda")
        model = copy.deepcopy(model).to(device)  # a copy: the caller's stays on the CPU
        args, kwargs = to_device(args, device), to_device(kwargs, device)
    return fn(model, *args, **kwargs)


#: Run a ViT analysis ``fn(model, *args, **kwargs)`` where the GPU is: a ZeroGPU call on a
#: ZeroGPU Space (results on the CPU), and a plain call everywhere else (the model already
#: sits on CUDA or the CPU, `explorer.models.default_device`).
analyse_on_device = gpu_task(duration=ANALYSIS_SECONDS)(_analyse_on_device)


# -- training on the GPU: a streamed call ----------------------------------------------------

# Sizing a training call. Nothing here was timed on ZeroGPU (this project had no GPU lent for
# it), so the rule adds up upper estimates of each cost and doubles them:
WORKER_START_S = 15  # the worker's fork, CUDA's start, the model's copy (`ANALYSIS_SECONDS`
#                      gives 20 s to that plus one forward pass)
STEP_S = 0.02  # an eager optimiser step of a small model is bound by its ~10^3 kernel launches
#                and the per-step `.item()` syncs, not by FLOPs
PIXEL_S = 25e-9  # the fine-tune's CPU data path (single-process loader: decode, resize,
#                  normalise), per pixel of the training resolution: 0.27 / 1.1 / 7.3 ms per
#                  image at 112 / 224 / 518 px, measured on this project's 2-vCPU machine
#                  (Fashion-MNIST, one thread)
GPU_FLOPS = 50e12  # sustained FLOP/s: a tenth of a ZeroGPU slice's peak (a 70 GB slice of an
#                    H200, about half its ~990 TFLOP/s dense bf16), as small ViTs at batch 32
#                    use little of it
MARGIN = 2.0
# The longest one call may ask for: 5 minutes (Hugging Face's answer in the zero-gpu-explorers
# discussions); ZeroGPU refuses a longer duration ("ZeroGPU illegal duration"), and a visitor
# whose quota left is shorter than the duration asked for is refused too.
MAX_CALL_S = 300


def work_seconds(steps: int, images: int = 0, pixels: int = 0, flops: float = 0.0,
                 seconds: float = 0.0) -> int:
    """How long a training call would hold the GPU, by the sizing rule (without the cap).

    Args:
        steps: optimiser steps (and other GPU steps that are launch-bound).
        images: images through the CPU data path, each of ``pixels`` pixels.
        flops: the call's GPU work in all, in FLOPs.
        seconds: other work, estimated by the caller in seconds (e.g. linear probes' steps,
            far lighter than a network's: `explorer.finetune.probe.PROBE_STEP_S`).

    Returns:
        ``WORKER_START_S + MARGIN × (steps·STEP_S + images·pixels·PIXEL_S + flops/GPU_FLOPS
        + seconds)``, rounded up to a second.
    """
    work = steps * STEP_S + images * pixels * PIXEL_S + flops / GPU_FLOPS + seconds
    return math.ceil(WORKER_START_S + MARGIN * work)


def training_seconds(steps: int, images: int = 0, pixels: int = 0, flops: float = 0.0,
                     seconds: float = 0.0) -> int:
    """The ZeroGPU duration to ask for a training call: `work_seconds`, `MAX_CALL_S` at most
    (a longer run is cut off there: the fine-tune tab refuses one up front)."""
    return min(MAX_CALL_S, work_seconds(steps, images, pixels, flops, seconds))


def _run_in_worker(seconds: float, gen_fn: Callable[..., Iterator], args: tuple,
                   kwargs: dict) -> Iterator:
    """The worker's side of `stream_on_device` (``seconds`` is for ZeroGPU's duration): the
    run with its own cancel, never set; closing the stream is what stops it there."""
    yield from gen_fn(*args, **kwargs)


def _asked_seconds(seconds: float, *_) -> float:
    return seconds


_worker_stream = gpu_task(duration=_asked_seconds)(_run_in_worker)


def stream_on_device(gen_fn: Callable[..., Iterator], *args, cancel: threading.Event,
                     seconds: float, on_cancel: Callable[[list], Any] | None = None,
                     **kwargs) -> Iterator:
    """``gen_fn(*args, cancel=cancel, **kwargs)``, a training generator, where the GPU is.

    Off ZeroGPU it is exactly that call (`explorer.trainer_process.stream_training` puts a
    training run in a child process instead where that pays). On ZeroGPU the generator runs
    in a worker that borrows a GPU for at most ``seconds``; its events come back on the CPU
    (`to_cpu`). The caller's ``cancel`` cannot reach the worker: it is checked here as each
    event arrives, and once set the stream is closed, which ``spaces`` turns into the
    worker's generator being closed at its next yield (a ``GeneratorExit`` there: the run
    stops at a step).

    Args:
        gen_fn: a module-level generator function (its name crosses to the worker) taking
            a ``cancel`` event.
        cancel: set it to stop the run.
        seconds: the ZeroGPU duration to ask for (`training_seconds`).
        on_cancel: ``(events streamed so far) -> last event``: on ZeroGPU the last event a
            cancelled run would have yielded (the worker, closed, cannot send it); None: the
            stream just ends.

    Returns:
        The run's events.
    """
    if not on_zero_gpu():
        return gen_fn(*args, cancel=cancel, **kwargs)
    return _stream_from_worker(gen_fn, args, kwargs, cancel, seconds, on_cancel)


def _stream_from_worker(gen_fn, args, kwargs, cancel, seconds, on_cancel) -> Iterator:
    stream = _worker_stream(seconds, gen_fn, args, kwargs)
    events, stopped = [], False
    try:
        for event in stream:
            if cancel.is_set():
                stopped = True
                break
            events.append(event)
            yield event
    finally:
        stream.close()  # returns once the worker's generator has ended
    if stopped and on_cancel is not None:
        yield on_cancel(events)
