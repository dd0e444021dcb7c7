"""The password-hash threads, where honest logins go before guesses.

A brute force makes the server hash for the attacker: an argon2id check costs tens of
milliseconds and tens of MiB, so a few hundred guessing connections, from one address or from
many, would queue ahead of every honest login. The protocol knows, before it asks for a check,
whether the attempt comes with a history: the failure counts of its address and of the pair
(:meth:`pop3shield.state.IState.counts`), and whether this user logged in from this address
lately (on any worker or host: the shared state remembers it). An attempt of such a known pair
is *trusted* and runs on the ``threads`` threads of its own; the others, *clean* (no failures)
before *suspect* (failures of its address or pair, at most ``suspect_threads`` at once), share
``untrusted_threads`` threads that run at the lowest CPU priority (nice 19, on Linux per
thread). A brute force from many fresh addresses (each one's first guess is clean) therefore
keeps that many hashes running and no more, on CPU time the known users and the event loops do
not want: a user who logged in before finds a free thread and a core, and the server's memory
stays bounded by the threads (an argon2id check holds its memory cost while it runs), not by the
flood. Without load the low priority costs nothing.

Everything here runs on the reactor thread; the hashing itself runs in two plain Twisted
:class:`~twisted.python.threadpool.ThreadPool` objects.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

__all__ = ["CLEAN", "SUSPECT", "TRUSTED", "HashPool"]

#: the standings of a login attempt, in the order they are served
TRUSTED, CLEAN, SUSPECT = 0, 1, 2
#: the nice value of the threads that hash for untrusted attempts
UNTRUSTED_NICE = 19

_niced = threading.local()


def _at_low_priority(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` on this thread after lowering its CPU priority, once per thread (a
    thread's nice value is its own on Linux; elsewhere it would be the process's: left alone)."""
    if not getattr(_niced, "done", False):
        _niced.done = True
        if sys.platform.startswith("linux"):
            try:
                tid = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), UNTRUSTED_NICE))
            except OSError:
                pass  # a sandbox without setpriority: the thread cap still bounds the flood
    return function(*args)


class _Gauges:
    """``queued`` and ``working`` of the trusted or the untrusted side of a :class:`HashPool`."""

    def __init__(self, pool: HashPool, trusted: bool) -> None:
        self._pool, self._trusted = pool, trusted

    @property
    def queued(self) -> int:
        queues = self._pool._queues
        return len(queues[TRUSTED]) if self._trusted else len(queues[CLEAN]) + len(queues[SUSPECT])

    @property
    def working(self) -> int:
        pool = self._pool
        return pool.running - pool.running_untrusted if self._trusted else pool.running_untrusted


class HashPool:
    """``threads`` hashing threads for trusted attempts; ``untrusted_threads`` low-priority ones
    (default: as many) for clean and then suspect attempts, at most ``suspect_threads`` of those
    at once."""

    def __init__(self, reactor: Any, threads: int, suspect_threads: int = 1, name: str = "pop3shield-hash",
                 untrusted_threads: int | None = None) -> None:
        untrusted_threads = threads if untrusted_threads is None else untrusted_threads
        if threads < 1 or suspect_threads < 1 or untrusted_threads < 1:
            raise ValueError("a hash pool needs at least one thread for each kind of attempt")
        self.reactor = reactor
        self.threads = threads
        self.untrusted_threads = untrusted_threads
        self.suspect_threads = min(suspect_threads, untrusted_threads)
        #: the threads themselves (what the metrics watch): trusted attempts', the others'
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name=name)
        self.untrusted_pool = ThreadPool(minthreads=0, maxthreads=untrusted_threads, name=name + "-untrusted")
        self.running = 0
        self.running_untrusted = 0
        self.running_suspect = 0
        #: a queue per standing: TRUSTED, CLEAN, SUSPECT
        self._queues: tuple[deque[tuple[defer.Deferred[Any], Callable[..., Any], tuple[Any, ...]]], ...] = (
            deque(), deque(), deque())

    @property
    def queued(self) -> int:
        return sum(len(queue) for queue in self._queues)

    def gauges(self, trusted: bool) -> Any:
        """The queue and the busy threads of one side, as the metrics read a thread pool."""
        return _Gauges(self, trusted)

    def start(self) -> None:
        self.pool.start()
        self.untrusted_pool.start()

    def stop(self) -> None:
        self.pool.stop()
        self.untrusted_pool.stop()

    def run(self, standing: int, function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """``function(*args)`` in a hashing thread, for an attempt of that standing (TRUSTED, CLEAN, SUSPECT).

        Cancelling the Deferred (the client left) drops the call if it has not started.
        """
        queue = self._queues[min(max(standing, TRUSTED), SUSPECT)]

        def cancel(d: defer.Deferred[Any]) -> None:
            try:
                queue.remove(job)
            except ValueError:  # running already: its result is dropped when it comes
                pass
        d: defer.Deferred[Any] = defer.Deferred(cancel)
        job = (d, function, args)
        queue.append(job)
        self._dispatch()
        return d

    def _dispatch(self) -> None:
        trusted, clean, suspects = self._queues
        while trusted and self.running - self.running_untrusted < self.threads:
            self._start(TRUSTED, trusted.popleft())
        while self.running_untrusted < self.untrusted_threads:
            if clean:
                self._start(CLEAN, clean.popleft())
            elif suspects and self.running_suspect < self.suspect_threads:
                self._start(SUSPECT, suspects.popleft())
            else:
                return

    def _start(self, standing: int, job: tuple[defer.Deferred[Any], Callable[..., Any], tuple[Any, ...]]) -> None:
        d, function, args = job
        self._count(standing, 1)
        if standing == TRUSTED:
            done = deferToThreadPool(self.reactor, self.pool, function, *args)
        else:
            done = deferToThreadPool(self.reactor, self.untrusted_pool, _at_low_priority, function, *args)
        done.addBoth(self._finished, standing, d)

    def _count(self, standing: int, step: int) -> None:
        self.running += step
        if standing != TRUSTED:
            self.running_untrusted += step
        if standing == SUSPECT:
            self.running_suspect += step

    def _finished(self, result: Any, standing: int, d: defer.Deferred[Any]) -> None:
        self._count(standing, -1)
        self._dispatch()
        if not d.called:  # not cancelled meanwhile
            d.callback(result)  # a Failure goes down the errback chain
