"""The one bounded, keyed cache: models, fast decoders, features and results all live in one.

Thread-safe for Gradio's worker threads. Each key has its own lock, so two first requests for
the same key build it once (the second waits for the first), while requests for other keys,
cached or not, are not blocked by a build in progress. Least recently used entries go first
when the cache holds more than `max_items` entries or more than `max_bytes` bytes (as
measured by `sizeof`, default: the bytes of every tensor found in the value).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import numpy as np
import torch

V = TypeVar("V")


def tensor_bytes(value: Any) -> int:
    """Bytes held by the tensors and numpy arrays in `value`: a tensor, an array, a module's
    parameters and buffers, or those found in (nested) tuples, lists, dicts and dataclass-like
    objects' fields."""
    seen: set[int] = set()

    def walk(v: Any) -> int:
        if id(v) in seen:
            return 0
        seen.add(id(v))
        if isinstance(v, torch.Tensor):
            return v.numel() * v.element_size()
        if isinstance(v, np.ndarray):
            return v.nbytes
        if isinstance(v, torch.nn.Module):
            return sum(walk(t) for t in (*v.parameters(), *v.buffers()))
        if isinstance(v, dict):
            return sum(walk(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return sum(walk(x) for x in v)
        if hasattr(v, "__dict__") and not isinstance(v, type):
            return sum(walk(x) for x in vars(v).values())
        return 0

    return walk(value)


class KeyedCache(Generic[V]):
    """A bounded LRU map with per-key build locks.

    Args:
        max_items: at most this many entries (None: no count bound).
        max_bytes: at most this many bytes by `sizeof` (None: no byte bound). An entry larger
            than the bound on its own is returned to its caller but not kept.
        sizeof: bytes of one value; default `tensor_bytes`.
    """

    def __init__(self, max_items: int | None = None, max_bytes: int | None = None,
                 sizeof: Callable[[Any], int] = tensor_bytes):
        self.max_items, self.max_bytes, self.sizeof = max_items, max_bytes, sizeof
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._building: dict[Hashable, threading.Lock] = {}
        self.hits = self.misses = 0

    # -- reading ---------------------------------------------------------------------------

    def get(self, key: Hashable) -> V | None:
        """The cached value (now most recently used), or None."""
        with self._lock:
            if key not in self._items:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key][0]

    def get_or_build(self, key: Hashable, build: Callable[[], V]) -> V:
        """The cached value, or `build()`'s, built once per key even when many threads ask."""
        value = self.get(key)
        if value is not None:
            return value
        with self._lock:
            key_lock = self._building.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._items:  # built by the thread we waited for
                    self._items.move_to_end(key)
                    return self._items[key][0]
            try:
                value = build()
                self.put(key, value)
            finally:
                with self._lock:
                    self._building.pop(key, None)
            return value

    # -- writing ---------------------------------------------------------------------------

    def put(self, key: Hashable, value: V) -> None:
        """Keep `value` under `key`, evicting the least recently used beyond the bounds."""
        size = self.sizeof(value) if self.max_bytes is not None else 0
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]
            if self.max_bytes is not None and size > self.max_bytes:
                return
            self._items[key] = (value, size)
            self._bytes += size
            while self._items and (
                (self.max_items is not None and len(self._items) > self.max_items)
                or (self.max_bytes is not None and self._bytes > self.max_bytes)
            ):
                self._bytes -= self._items.popitem(last=False)[1][1]

    def evict(self, key: Hashable) -> None:
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    # -- introspection ---------------------------------------------------------------------

    def keys(self) -> list[Hashable]:
        """Keys, least recently used first."""
        with self._lock:
            return list(self._items)

    @property
    def nbytes(self) -> int:
        """Bytes held (0 when no byte bound is set: sizes are then not measured)."""
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items


def weights_fingerprint(model: torch.nn.Module, skip_prefixes: tuple[str, ...] = ()) -> str:
    """A key for results computed from a model's weights: equal models, equal keys.

    Digests the class, timm architecture name, and every parameter's and buffer's name,
    shape, dtype, sum and sum of squares (float64; one transfer from the device), so two
    models with other weights never share a cache entry under one name, while hashing every
    byte (seconds for a large model) is avoided.

    Args:
        skip_prefixes: state-dict names to leave out, e.g. ``("head.",)`` for results the
            classifier does not change (pre-logits features, attention).
    """
    import hashlib

    digest = hashlib.sha1(type(model).__qualname__.encode())
    digest.update(str(getattr(model, "pretrained_cfg", {}).get("architecture")).encode())
    moments = []
    for name, tensor in model.state_dict().items():
        if skip_prefixes and name.startswith(skip_prefixes):
            continue
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        t = tensor.detach().double()
        moments += [t.sum(), t.square().sum()]
    if moments:
        digest.update(torch.stack(moments).cpu().numpy().tobytes())
    return digest.hexdigest()
