"""The slow tier of the malicious-code protection, run in its own bounded thread pool, shared fairly.

Emulating a suspicious argument takes milliseconds; a flood of long arguments must neither stall
the reactor nor slip through, nor crowd out everybody else. So the work runs in a small dedicated
pool, and the queue in front of it is this module's, not the pool's:

* requests are grouped by **source**, the client address collapsed to a network (``/24`` for
  IPv4, ``/64`` for IPv6 by default: one host, one home, one small office), and the sources
  are served round-robin, not first come first served;
* one source holds at most ``source_running`` workers (default ``max(1, threads // 2)``) and
  ``source_queue`` queued requests (default half of ``max_pending``: the simultaneous logins of a NAT fit); past its share its
  new requests are refused at once;
* when the whole queue (``max_pending``) is full, a newcomer takes the place of the newest
  request of the source with the most queued, if that source holds more than the newcomer's
  would; otherwise it is refused;
* a queued request waits at most ``wait`` seconds for a worker, then is refused.

A refusal is a list of ``None``: the session answers the command ``-ERR [SYS/TEMP]`` and the
refusal is counted (``refused``, by reason) and logged, rate-limited, as an operational line,
never as a security event in the name of the user who arrived during a flood.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

__all__ = ["Analyzer", "source_key"]

DeepCheck = Callable[[bytes], Any]

log = Logger(namespace="pop3shield.server")

#: seconds between two log lines about refused analyses (the counter has every one)
REFUSAL_LOG_INTERVAL = 10.0


def _default_deep_check() -> DeepCheck:
    from pop3shield.mcp import deep_check_cached

    return deep_check_cached


def source_key(address: str | None, ipv4_prefix: int = 24, ipv6_prefix: int = 64) -> str:
    """The network an address is served as: ``/24`` or ``/64`` (IPv4-mapped IPv6 as IPv4)."""
    if not address:
        return "-"
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address  # a unix socket path or the like: its own source
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = ipv4_prefix if ip.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network((ip, prefix), strict=False))


class _Job:
    __slots__ = ("arguments", "source", "deferred", "queued", "timer")

    def __init__(self, arguments: tuple[bytes, ...], source: str, deferred: defer.Deferred[Any],
                 queued: float) -> None:
        self.arguments = arguments
        self.source = source
        self.deferred = deferred
        self.queued = queued
        self.timer: Any = None


class Analyzer:
    """Runs deep checks for the protocol, fairly across sources, in bounded memory and time."""

    def __init__(
        self,
        reactor: Any,
        *,
        threads: int = 2,
        max_pending: int = 32,
        source_running: int | None = None,
        source_queue: int | None = None,
        wait: float = 2.0,
        ipv4_prefix: int = 24,
        ipv6_prefix: int = 64,
        deep_check: DeepCheck | None = None,
        observe_wait: Callable[[float], None] | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.threads = threads
        self.max_pending = max_pending
        self.source_running = source_running if source_running is not None else max(1, threads // 2)
        self.source_queue = source_queue if source_queue is not None else max(1, max_pending // 2)
        self.wait = wait
        self.ipv4_prefix = ipv4_prefix
        self.ipv6_prefix = ipv6_prefix
        #: the detector's own check: its emulators are made ahead of time when the pool starts
        self._warm_up = deep_check is None
        self.deep_check = deep_check if deep_check is not None else _default_deep_check()
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name="pop3shield-mcp")
        #: called in the pool's thread with the seconds an analysis waited for it (the metrics)
        self.observe_wait = observe_wait
        #: called on the reactor with the reason of each refusal: "share", "full", "wait"
        self.on_refused = on_refused
        #: requests refused for capacity, in total and by reason
        self.refused = 0
        self.refused_by: dict[str, int] = {"share": 0, "full": 0, "wait": 0}
        self.running = 0
        self._running_by: dict[str, int] = {}
        #: the sources with queued requests, in round-robin order (the next one served is first)
        self._queues: OrderedDict[str, deque[_Job]] = OrderedDict()
        self.queued = 0
        self._last_log = -REFUSAL_LOG_INTERVAL
        self._logged_refusals = 0

    @property
    def pending(self) -> int:
        """Requests queued or running (the queue-depth gauge)."""
        return self.queued + self.running

    def start(self) -> None:
        self.pool.start()
        if self._warm_up:
            # in a pool thread, not on the reactor: creating the emulators for every thread takes
            # tens of milliseconds, which otherwise the first long argument of each thread pays
            from pop3shield.mcp import prepare

            self.pool.callInThread(prepare, self.threads)

    def stop(self) -> None:
        for source in list(self._queues):
            for job in list(self._queues.get(source, ())):
                self._drop(job, "wait")
        self.pool.stop()

    # ------------------------------------------------------------------ admission

    def analyze(self, arguments: Sequence[bytes], source: str | None = None) -> defer.Deferred[list[Any]]:
        """Verdicts in order, or a list of ``None`` when no capacity is left for this source (fail closed).

        ``source`` is the client's address; cancelling the Deferred (the client left) drops a queued request.
        """
        key = source_key(source, self.ipv4_prefix, self.ipv6_prefix)
        arguments = tuple(arguments)
        queue = self._queues.get(key)
        held = len(queue) if queue is not None else 0
        if held >= self.source_queue:
            return self._refuse(len(arguments), "share", key)
        if self.queued >= self.max_pending and not self._make_room(key, held):
            return self._refuse(len(arguments), "full", key)
        job = _Job(arguments, key, defer.Deferred(lambda d: self._cancel(job)), time.monotonic())
        if queue is None:
            queue = self._queues[key] = deque()
        queue.append(job)
        self.queued += 1
        job.timer = self.reactor.callLater(self.wait, self._expire, job)
        self._dispatch()
        return job.deferred

    def _make_room(self, newcomer: str, held: int) -> bool:
        """A full queue: the source with the most queued gives up its newest one, if it holds more."""
        biggest = max((key for key in self._queues if key != newcomer), key=lambda k: len(self._queues[k]),
                      default=None)
        if biggest is None or len(self._queues[biggest]) <= held + 1:
            return False
        self._drop(self._queues[biggest][-1], "full")
        return True

    def _refuse(self, count: int, reason: str, source: str) -> defer.Deferred[list[Any]]:
        self._count_refusal(reason, source)
        return defer.succeed([None] * count)

    def _count_refusal(self, reason: str, source: str) -> None:
        self.refused += 1
        self.refused_by[reason] += 1
        if self.on_refused is not None:
            self.on_refused(reason)
        now = self.reactor.seconds()
        self._logged_refusals += 1
        if now - self._last_log >= REFUSAL_LOG_INTERVAL:
            log.warn("malicious-code analysis at capacity: {count} commands refused [SYS/TEMP] since the "
                     "last such line (latest: {reason}, source {source}; {threads} threads, queue {max_pending}, "
                     "{source_queue} per source)",
                     count=self._logged_refusals, reason=reason, source=source, threads=self.threads,
                     max_pending=self.max_pending, source_queue=self.source_queue)
            self._last_log = now
            self._logged_refusals = 0

    def _unqueue(self, job: _Job) -> bool:
        queue = self._queues.get(job.source)
        if queue is None:
            return False
        try:
            queue.remove(job)  # at most source_queue long
        except ValueError:
            return False
        self.queued -= 1
        if not queue:
            del self._queues[job.source]
        if job.timer is not None and job.timer.active():
            job.timer.cancel()
        job.timer = None
        return True

    def _drop(self, job: _Job, reason: str) -> None:
        if self._unqueue(job):
            self._count_refusal(reason, job.source)
            job.deferred.callback([None] * len(job.arguments))

    def _expire(self, job: _Job) -> None:
        job.timer = None
        self._drop(job, "wait")

    def _cancel(self, job: _Job) -> None:
        self._unqueue(job)  # queued: dropped; running: its result is thrown away when it comes

    # ------------------------------------------------------------------ round-robin dispatch

    def _dispatch(self) -> None:
        while self.running < self.threads and self._queues:
            job = self._next()
            if job is None:
                return
            self._start(job)

    def _next(self) -> _Job | None:
        """The first source in round-robin order under its worker share gives its oldest request."""
        for key in list(self._queues):
            if self._running_by.get(key, 0) >= self.source_running:
                continue
            queue = self._queues[key]
            job = queue[0]
            self._unqueue(job)
            if key in self._queues:
                self._queues.move_to_end(key)  # its turn is over: the others come first
            return job
        return None

    def _start(self, job: _Job) -> None:
        self.running += 1
        self._running_by[job.source] = self._running_by.get(job.source, 0) + 1
        d = deferToThreadPool(self.reactor, self.pool, self._run, job.arguments, job.queued)
        d.addBoth(self._done, job)

    def _run(self, arguments: tuple[bytes, ...], queued: float) -> list[Any]:
        if self.observe_wait is not None:
            self.observe_wait(time.monotonic() - queued)
        return [self.deep_check(argument) for argument in arguments]

    def _done(self, result: Any, job: _Job) -> None:
        self.running -= 1
        left = self._running_by[job.source] - 1
        if left:
            self._running_by[job.source] = left
        else:
            del self._running_by[job.source]
        if not job.deferred.called:  # else cancelled: the client left, the verdicts go nowhere
            if isinstance(result, Failure):
                job.deferred.errback(result)
            else:
                job.deferred.callback(result)
        self._dispatch()
