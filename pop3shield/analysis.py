"""The slow tier of the malicious-code protection, run in its own bounded thread pool.

Emulating a suspicious argument takes milliseconds; a flood of long arguments must neither stall
the reactor nor slip through. So the work runs in a small dedicated pool with a bounded queue,
and when the queue is full the answer is ``None``: the session then refuses the command (fails
closed) and reports why.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

DeepCheck = Callable[[bytes], Any]


def _default_deep_check() -> DeepCheck:
    from pop3shield.mcp import deep_check_cached

    return deep_check_cached


class Analyzer:
    """Runs deep checks for the protocol; at most ``max_pending`` requests queued or running."""

    def __init__(
        self,
        reactor: Any,
        *,
        threads: int = 2,
        max_pending: int = 32,
        deep_check: DeepCheck | None = None,
        observe_wait: Callable[[float], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.max_pending = max_pending
        self.pending = 0
        self.refused = 0
        self.deep_check = deep_check if deep_check is not None else _default_deep_check()
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name="pop3shield-mcp")
        #: called in the pool's thread with the seconds an analysis waited for it (the metrics)
        self.observe_wait = observe_wait

    def start(self) -> None:
        self.pool.start()

    def stop(self) -> None:
        self.pool.stop()

    def analyze(self, arguments: Sequence[bytes]) -> defer.Deferred[list[Any]]:
        """Verdicts in order, or a list of ``None`` when the pool has no room (fail closed)."""
        if self.pending >= self.max_pending:
            self.refused += 1
            return defer.succeed([None] * len(arguments))
        self.pending += 1
        d = deferToThreadPool(self.reactor, self.pool, self._run, tuple(arguments), time.monotonic())
        d.addBoth(self._done)
        return d

    def _run(self, arguments: tuple[bytes, ...], queued: float) -> list[Any]:
        if self.observe_wait is not None:
            self.observe_wait(time.monotonic() - queued)
        return [self.deep_check(argument) for argument in arguments]

    def _done(self, result: Any) -> Any:
        self.pending -= 1
        return result
