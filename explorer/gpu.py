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


def to_cpu(value: Any) -> Any:
    """`value` with every tensor inside it (tuples, lists, dicts, dataclasses) on the CPU;
    CPU tensors and everything else are returned as they are."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, (list, tuple)):
        items = [to_cpu(v) for v in value]
        if all(a is b for a, b in zip(items, value, strict=True)):
            return value
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: to_cpu(getattr(value, f.name)) for f in dataclasses.fields(value)
                   if f.init}
        return dataclasses.replace(value, **changes)
    return value


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
