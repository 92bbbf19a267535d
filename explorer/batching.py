"""Concurrent analyses that share one forward pass (issue 23, item 3).

A room opens the same example at the same size at the same moment. On a GPU a forward pass
of 1 or 8 images costs nearly the same, so concurrent calls of one analysis on one model and
input shape are better run as one batch: `MicroBatcher` collects the calls that arrive within
a few milliseconds of each other, runs the function once on their concatenated inputs, and
hands each caller its own slice of the result. On the CPU a ViT-S forward is already
matrix-bound (per image: 155 / 151 / 148 ms at batch 1 / 2 / 4, BENCHMARKS "A room served
together"), so batching would only make the first caller wait: there the call runs alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

R = TypeVar("R")


@dataclass
class _Batch:
    inputs: list[torch.Tensor] = field(default_factory=list)
    full: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    results: list[Any] | None = None
    error: BaseException | None = None


class MicroBatcher(Generic[R]):
    """``fn(model, inputs, **kwargs)`` for concurrent callers, one batched call for those with
    the same model, input shape (but the batch), dtype, device and keyword arguments.

    The first caller of a batch waits up to ``wait_s`` for others (or until ``max_batch``
    inputs are in), then runs ``fn`` on them all and ``split(result, sizes)`` gives each
    caller its part; an error reaches every caller of the batch.

    Args:
        fn: the analysis, batched along the first dimension of ``inputs``.
        split: a result of ``fn`` and the callers' batch sizes -> one result per caller.
        wait_s: how long the first caller waits for company.
        max_batch: most images in one call.
        devices: device types on which calls are shared; elsewhere ``fn`` runs as it is.
    """

    def __init__(self, fn: Callable[..., R], split: Callable[[R, Sequence[int]], list[R]],
                 wait_s: float = 0.005, max_batch: int = 8, devices: tuple[str, ...] = ("cuda",)):
        self.fn, self.split = fn, split
        self.wait_s, self.max_batch, self.devices = wait_s, max_batch, devices
        self._lock = threading.Lock()
        self._open: dict[Hashable, _Batch] = {}
        self.calls = 0  # how many times ``fn`` ran (for tests and benchmarks)

    def __call__(self, model: torch.nn.Module, inputs: torch.Tensor, **kwargs) -> R:
        if inputs.device.type not in self.devices:
            return self.fn(model, inputs, **kwargs)
        key = (id(model), tuple(inputs.shape[1:]), inputs.dtype, str(inputs.device),
               tuple(sorted(kwargs.items())))
        with self._lock:
            batch = self._open.get(key)
            leader = batch is None
            if leader:
                batch = self._open[key] = _Batch()
            index = len(batch.inputs)
            batch.inputs.append(inputs)
            if sum(len(x) for x in batch.inputs) >= self.max_batch:
                del self._open[key]  # full: the next caller starts a new batch
                batch.full.set()
        if not leader:
            batch.done.wait()
        else:
            batch.full.wait(self.wait_s)
            with self._lock:
                if self._open.get(key) is batch:
                    del self._open[key]  # closed: nobody joins after this
            try:
                self.calls += 1
                result = self.fn(model, torch.cat(batch.inputs), **kwargs)
                batch.results = self.split(result, [len(x) for x in batch.inputs])
            except BaseException as err:  # every caller of the batch gets it
                batch.error = err
            finally:
                batch.done.set()
        if batch.error is not None:
            raise batch.error
        return batch.results[index]
