"""What sessions keep between events: one byte-bounded LRU store shared by every session.

A browser session's kept results (the attention tab's q/k and head means, ...) live here,
under a small key that the session holds (in ``gr.State`` in the UI), instead of in the
session itself: memory then stops growing with the number of people in the room. When the
store is over its bound the least recently used entries go; whoever owned one rebuilds it
from the inputs in its ref (`SessionStore.get_or_rebuild`) on its next event.

Sizes are measured with `explorer.cache.tensor_bytes` (tensors and numpy arrays); the bound is
`explorer.settings.Settings.store_mb`. Keys are chosen by `explorer.session_context`; sizes
per entry: BENCHMARKS.md, "Serving a lecture hall".
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from explorer.cache import KeyedCache
from explorer.settings import Settings


@dataclass(frozen=True)
class Ref:
    """What a session holds instead of a result: where it is kept and how to rebuild it.

    Attributes:
        key: where it is kept (`explorer.session_context`: session id and kind of result).
        inputs: what rebuilds the entry (an upload path, model name, size, ...).
    """

    key: Hashable
    inputs: Hashable


class SessionStore:
    """Results kept between a session's events, one per key, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.cache: KeyedCache[Any] = KeyedCache(max_bytes=max_bytes)
        self.rebuilds = 0

    def keep(self, key: Hashable, inputs: Hashable, value: Any) -> Ref:
        """Keep ``value``, built from ``inputs``, under ``key`` (replacing what it held)."""
        ref = Ref(key, inputs)
        self.cache.put(key, (inputs, value))
        return ref

    def get_or_rebuild(self, ref: Ref, rebuild: Callable[[Any], Any]) -> Any:
        """The kept value, or ``rebuild(ref.inputs)``'s after an eviction (kept again).

        An entry kept for other inputs (an older ref of the same key) is not this ref's: it
        is rebuilt too.
        """
        entry = self.cache.get(ref.key)
        if entry is not None and entry[0] == ref.inputs:
            return entry[1]
        value = rebuild(ref.inputs)
        self.rebuilds += 1
        self.cache.put(ref.key, (ref.inputs, value))
        return value

    def peek(self, key: Hashable, inputs: Hashable) -> Any | None:
        """What ``key`` keeps for these very inputs, if still kept (no rebuild)."""
        entry = self.cache.get(key)
        return entry[1] if entry is not None and entry[0] == inputs else None

    def drop(self, where: Callable[[Hashable], bool]) -> None:
        """Forget every entry whose key ``where`` selects (a session that ended)."""
        for key in self.cache.keys():
            if where(key):
                self.cache.evict(key)

    def resize(self, max_bytes: int) -> None:
        """Bound the store at ``max_bytes`` from the next entry on."""
        self.cache.max_bytes = max_bytes

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes

    def __len__(self) -> int:
        return len(self.cache)


STORE = SessionStore(max_bytes=int(Settings().store_mb * 2**20))  # the app resizes it at start
