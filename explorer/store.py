"""What sessions keep between events: one byte-bounded LRU store shared by every session.

A browser session's kept results (the attention tab's q/k and head means, ...) live here,
under a small key that the session holds (in ``gr.State`` in the UI), instead of in the
session itself: memory then stops growing with the number of people in the room. When the
store is over its bound the least recently used entries go; whoever owned one rebuilds it
from the inputs in its key (`SessionStore.get_or_rebuild`) on its next event.

The bound is ``VIT_EXPLORER_STORE_MB`` (default `DEFAULT_MB`); sizes are measured with
`explorer.cache.tensor_bytes` (tensors and numpy arrays). Sizes per entry: BENCHMARKS.md,
"Serving a lecture hall".
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from explorer.cache import KeyedCache

# Attention analyses of DINOv2 ViT-S/14 (float16 maps, `AttentionMaps.compact`): about 73 MB
# at 518 px (5 fit) and 7 MB at 224 px (about 55 fit).
DEFAULT_MB = 384


def bound_bytes() -> int:
    """The store's bound in bytes, from ``VIT_EXPLORER_STORE_MB``."""
    return int(float(os.environ.get("VIT_EXPLORER_STORE_MB", DEFAULT_MB)) * 2**20)


@dataclass(frozen=True)
class Ref:
    """What a session holds instead of a result: where it is kept and how to rebuild it.

    Attributes:
        key: (session id, tab) in the store.
        inputs: the arguments that rebuild the entry (an upload path, model name, size, ...).
    """

    key: tuple[str, str]
    inputs: tuple


class SessionStore:
    """Results kept between a session's events, under (session, tab), bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.cache: KeyedCache[Any] = KeyedCache(max_bytes=max_bytes)
        self.rebuilds = 0

    def keep(self, session: str | None, tab: str, inputs: tuple, value: Any) -> Ref:
        """Keep ``value`` for ``session``'s ``tab`` (replacing its previous one); the ref."""
        ref = Ref((session or uuid.uuid4().hex, tab), tuple(inputs))
        self.cache.put(ref.key, (ref.inputs, value))
        return ref

    def get_or_rebuild(self, ref: Ref, rebuild: Callable[..., Any]) -> Any:
        """The kept value, or ``rebuild(*ref.inputs)``'s after an eviction (kept again).

        An entry kept for other inputs (an older ref of the same session and tab) is not
        this ref's: it is rebuilt too.
        """
        entry = self.cache.get(ref.key)
        if entry is not None and entry[0] == ref.inputs:
            return entry[1]
        value = rebuild(*ref.inputs)
        self.rebuilds += 1
        self.cache.put(ref.key, (ref.inputs, value))
        return value

    def peek(self, session: str | None, tab: str, inputs: tuple) -> Any | None:
        """What ``session``'s ``tab`` keeps for these very inputs, if still kept (no rebuild):
        for another tab that can reuse it."""
        entry = self.cache.get((session, tab)) if session else None
        return entry[1] if entry is not None and entry[0] == tuple(inputs) else None

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes

    def __len__(self) -> int:
        return len(self.cache)


STORE = SessionStore(bound_bytes())
