"""A bounded, thread-safe LRU cache of tier 1 verdicts.

Attackers (and scanners) repeat the same long argument many times; emulating it again each
time would hand them a cheap way to burn CPU.  Keys are BLAKE2b digests of the argument so a
full cache holds a bounded amount of memory however long the arguments were.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable

from .verdict import Verdict


class VerdictCache:
    """Least-recently-used map from argument to verdict, safe to share between threads."""

    def __init__(self, capacity: int = 4096) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._items: OrderedDict[bytes, Verdict] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(argument: bytes) -> bytes:
        return hashlib.blake2b(argument, digest_size=16).digest()

    def get(self, argument: bytes) -> Verdict | None:
        key = self.key(argument)
        with self._lock:
            verdict = self._items.get(key)
            if verdict is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return verdict

    def put(self, argument: bytes, verdict: Verdict) -> None:
        key = self.key(argument)
        with self._lock:
            self._items[key] = verdict
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get_or_compute(self, argument: bytes, compute: Callable[[bytes], Verdict]) -> Verdict:
        """The cached verdict, or ``compute(argument)`` stored for next time.

        The computation runs outside the lock: two threads may analyse the same new argument
        at once, which costs time but never blocks the other arguments.
        """
        verdict = self.get(argument)
        if verdict is None:
            verdict = compute(argument)
            self.put(argument, verdict)
        return verdict

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.hits = self.misses = 0
