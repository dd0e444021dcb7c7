"""A bounded, thread-safe cache of tier 1 verdicts that a flood cannot wash out.

Attackers (and scanners) repeat the same long argument many times; emulating it again each
time would hand them a cheap way to burn CPU.  Honest users repeat theirs too: a user with a
long passphrase sends it at every login, and should pay for its analysis once.  A plain LRU
would let a flood of distinct long arguments push every such verdict out, so the cache is a
segmented LRU: a new verdict enters a probation segment, and only a verdict asked for again
moves to the protected segment (at most :data:`PROTECTED_SHARE` of the capacity), which new
arguments never evict; the protected segment's least recently used entries fall back to
probation when it is full.

Keys are keyed BLAKE2b digests of the argument (the key is random per process), so a full
cache holds a bounded amount of memory however long the arguments were, and what it holds
is no fast unsalted hash of anybody's password.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable

from .verdict import Verdict

#: share of the capacity kept for verdicts that were asked for at least twice
PROTECTED_SHARE = 0.8


class VerdictCache:
    """Segmented LRU map from argument to verdict, safe to share between threads."""

    def __init__(self, capacity: int = 4096) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.protected_capacity = int(capacity * PROTECTED_SHARE)
        self._probation: OrderedDict[bytes, Verdict] = OrderedDict()
        self._protected: OrderedDict[bytes, Verdict] = OrderedDict()
        self._lock = threading.Lock()
        self._key = secrets.token_bytes(16)
        self.hits = 0
        self.misses = 0

    def key(self, argument: bytes) -> bytes:
        return hashlib.blake2b(argument, digest_size=16, key=self._key).digest()

    def get(self, argument: bytes) -> Verdict | None:
        key = self.key(argument)
        with self._lock:
            verdict = self._protected.get(key)
            if verdict is not None:
                self._protected.move_to_end(key)
            else:
                verdict = self._probation.pop(key, None)
                if verdict is None:
                    self.misses += 1
                    return None
                self._protect(key, verdict)
            self.hits += 1
            return verdict

    def _protect(self, key: bytes, verdict: Verdict) -> None:
        """Move a verdict asked for again into the protected segment (lock held)."""
        self._protected[key] = verdict
        while len(self._protected) > self.protected_capacity:
            old, value = self._protected.popitem(last=False)
            self._probation[old] = value  # back on probation, as its most recent entry
        self._trim()

    def _trim(self) -> None:
        while len(self._probation) + len(self._protected) > self.capacity:
            if self._probation:
                self._probation.popitem(last=False)
            else:
                self._protected.popitem(last=False)

    def put(self, argument: bytes, verdict: Verdict) -> None:
        key = self.key(argument)
        with self._lock:
            if key in self._protected:
                self._protected[key] = verdict
                self._protected.move_to_end(key)
                return
            self._probation[key] = verdict
            self._probation.move_to_end(key)
            self._trim()

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
            return len(self._probation) + len(self._protected)

    def clear(self) -> None:
        with self._lock:
            self._probation.clear()
            self._protected.clear()
            self.hits = self.misses = 0
