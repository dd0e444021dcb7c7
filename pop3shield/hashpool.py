"""The password-hash threads, where honest logins go before guesses.

A brute force makes the server hash for the attacker: an argon2id check costs tens of
milliseconds and tens of MiB, so a few hundred guessing connections, from one address or from
many, would queue ahead of every honest login. The protocol knows, before it asks for a check,
whether the attempt comes with a history: the failure counts of its address and of the pair
(:meth:`pop3shield.state.IState.counts`), and whether this user logged in from this address
lately (on any worker or host: the shared state remembers it). An attempt of such a known pair
is *trusted* and goes first, on any thread; one with no failures is *clean* and comes next; one
with failures is *suspect*: it waits behind the others and holds at most ``suspect_threads``
threads at once. Clean and suspect attempts together hold at most ``untrusted_threads``
threads: a brute force from many fresh addresses (each one's first guess is clean) keeps that
many hashes running and no more, so the users who logged in before find a free thread and a
core that is not shared with a crowd of argon2id guesses (each of which also holds its memory
cost while it runs), and the server's memory stays bounded by the threads, not by the flood.

Everything here runs on the reactor thread; the hashing itself runs in a plain Twisted
:class:`~twisted.python.threadpool.ThreadPool`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

__all__ = ["CLEAN", "SUSPECT", "TRUSTED", "HashPool"]

#: the standings of a login attempt, in the order they are served
TRUSTED, CLEAN, SUSPECT = 0, 1, 2


class HashPool:
    """``threads`` hashing threads: trusted attempts, then clean ones, then suspect ones; at most
    ``untrusted_threads`` clean and suspect ones at once (None: all threads), of which at most
    ``suspect_threads`` suspect ones."""

    def __init__(self, reactor: Any, threads: int, suspect_threads: int = 1, name: str = "pop3shield-hash",
                 untrusted_threads: int | None = None) -> None:
        if threads < 1 or suspect_threads < 1 or (untrusted_threads is not None and untrusted_threads < 1):
            raise ValueError("a hash pool needs at least one thread, and one for untrusted and suspect attempts")
        self.reactor = reactor
        self.threads = threads
        self.untrusted_threads = threads if untrusted_threads is None else min(untrusted_threads, threads)
        self.suspect_threads = min(suspect_threads, self.untrusted_threads)
        #: the threads themselves (what the metrics watch)
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name=name)
        self.running = 0
        self.running_untrusted = 0
        self.running_suspect = 0
        #: a queue per standing: TRUSTED, CLEAN, SUSPECT
        self._queues: tuple[deque[tuple[defer.Deferred[Any], Callable[..., Any], tuple[Any, ...]]], ...] = (
            deque(), deque(), deque())

    @property
    def queued(self) -> int:
        return sum(len(queue) for queue in self._queues)

    def start(self) -> None:
        self.pool.start()

    def stop(self) -> None:
        self.pool.stop()

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
        while self.running < self.threads:
            room = self.running_untrusted < self.untrusted_threads
            if trusted:
                standing, (d, function, args) = TRUSTED, trusted.popleft()
            elif clean and room:
                standing, (d, function, args) = CLEAN, clean.popleft()
            elif suspects and room and self.running_suspect < self.suspect_threads:
                standing, (d, function, args) = SUSPECT, suspects.popleft()
            else:
                return
            self._count(standing, 1)
            done = deferToThreadPool(self.reactor, self.pool, function, *args)
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
