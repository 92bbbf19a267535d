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
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def on_zero_gpu() -> bool:
    """Whether this process runs on a ZeroGPU Space (as ``spaces.config`` decides it)."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def to_device(value: Any, device: torch.device | str) -> Any:
    """`value` with every tensor inside it (tuples, lists, dicts, dataclasses) on ``device``;
    tensors already there and everything else are returned as they are."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
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


def to_cpu(value: Any) -> Any:
    """`to_device` the CPU: what may cross ZeroGPU's process boundary."""
    return to_device(value, "cpu")


def gpu_task(duration: float | Callable[..., float] = 60) -> Callable[[F], F]:
    """Decorator: ``spaces.GPU(duration=duration)`` on a ZeroGPU Space, results on the CPU;
    elsewhere the function itself.

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
            def on_cpu(*args, **kwargs):
                for item in fn(*args, **kwargs):
                    yield to_cpu(item)
        else:
            @functools.wraps(fn)
            def on_cpu(*args, **kwargs):
                return to_cpu(fn(*args, **kwargs))
        return spaces.GPU(duration=duration)(on_cpu)

    return decorate


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
    if on_zero_gpu() and torch.cuda.is_available():
        device = torch.device("cuda")
        model = copy.deepcopy(model).to(device)  # a copy: the caller's stays on the CPU
        args, kwargs = to_device(args, device), to_device(kwargs, device)
    return fn(model, *args, **kwargs)


#: Run a ViT analysis ``fn(model, *args, **kwargs)`` where the GPU is: a ZeroGPU call on a
#: ZeroGPU Space (results on the CPU), and a plain call everywhere else (the model already
#: sits on CUDA or the CPU, `explorer.models.default_device`).
analyse_on_device = gpu_task(duration=ANALYSIS_SECONDS)(_analyse_on_device)
