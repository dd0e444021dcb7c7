"""pop3shield.hashpool: trusted login attempts first, then clean ones, then suspect ones, which hold one thread."""

from __future__ import annotations

import threading
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest

from pop3shield.hashpool import CLEAN, SUSPECT, TRUSTED, HashPool


class HashPoolTests(unittest.TestCase):
    def setUp(self) -> None:
        self.pool = HashPool(reactor, threads=2, suspect_threads=1)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.gate = threading.Event()
        self.addCleanup(self.gate.set)
        self.order: list[str] = []
        self.lock = threading.Lock()

    def work(self, name: str, block: bool = True) -> str:
        if block:
            self.gate.wait(10)
        with self.lock:
            self.order.append(name)
        return name

    @defer.inlineCallbacks
    def test_suspect_attempts_hold_one_thread_and_wait_behind_clean_ones(self):
        first = self.pool.run(SUSPECT, self.work, "s1")
        second = self.pool.run(SUSPECT, self.work, "s2")  # the one suspect thread is taken: it waits
        clean = self.pool.run(CLEAN, self.work, "c1", False)  # the other thread is free for it
        self.assertEqual((yield clean), "c1")
        self.assertEqual((self.pool.running, self.pool.running_suspect, self.pool.queued), (1, 1, 1))
        self.gate.set()
        self.assertEqual((yield defer.gatherResults([first, second])), ["s1", "s2"])
        self.assertEqual((self.pool.running, self.pool.running_suspect, self.pool.queued), (0, 0, 0))

    @defer.inlineCallbacks
    def test_a_clean_attempt_that_came_later_goes_before_a_suspect_one(self):
        pool = HashPool(reactor, threads=1, untrusted_threads=1)  # one thread: service order is work order
        pool.start()
        self.addCleanup(pool.stop)
        first = pool.run(SUSPECT, self.work, "s1")
        suspect = pool.run(SUSPECT, self.work, "s2")
        clean = pool.run(CLEAN, self.work, "c2")
        self.gate.set()
        self.assertEqual((yield defer.gatherResults([first, suspect, clean])), ["s1", "s2", "c2"])
        self.assertEqual(self.order, ["s1", "c2", "s2"])

    @defer.inlineCallbacks
    def test_failures_reach_the_caller_and_free_the_thread(self):
        def broken() -> None:
            raise ValueError("no")
        with self.assertRaises(ValueError):
            yield self.pool.run(SUSPECT, broken)
        self.assertEqual((self.pool.running, self.pool.running_suspect), (0, 0))
        self.assertEqual((yield self.pool.run(SUSPECT, self.work, "after", False)), "after")

    @defer.inlineCallbacks
    def test_a_cancelled_queued_attempt_never_runs(self):
        self.pool.run(CLEAN, self.work, "a")
        self.pool.run(CLEAN, self.work, "b")  # both threads busy
        waiting = self.pool.run(CLEAN, self.work, "never", False)
        waiting.cancel()
        self.failureResultOf(waiting, defer.CancelledError)
        self.assertEqual(self.pool.queued, 0)
        self.gate.set()
        d = self.pool.run(CLEAN, self.work, "last", False)
        self.assertEqual((yield d), "last")
        time.sleep(0.1)
        self.assertNotIn("never", self.order)

    @defer.inlineCallbacks
    def test_trusted_attempts_do_not_wait_for_clean_ones(self):
        pool = HashPool(reactor, threads=1, untrusted_threads=1)
        pool.start()
        self.addCleanup(pool.stop)
        pool.run(CLEAN, self.work, "busy")  # holds the one untrusted thread
        clean = pool.run(CLEAN, self.work, "clean", False)
        trusted = pool.run(TRUSTED, self.work, "trusted", False)  # came last, served at once
        self.assertEqual((yield trusted), "trusted")
        self.assertEqual(self.order, ["trusted"])
        self.assertEqual(pool.queued, 1)
        self.gate.set()
        self.assertEqual((yield clean), "clean")
        self.assertEqual(self.order, ["trusted", "busy", "clean"])

    @defer.inlineCallbacks
    def test_untrusted_attempts_hold_at_most_their_threads_and_trusted_ones_find_one(self):
        pool = HashPool(reactor, threads=3, suspect_threads=1, untrusted_threads=2)
        pool.start()
        self.addCleanup(pool.stop)
        fresh = [pool.run(CLEAN, self.work, f"c{n}") for n in range(5)]  # a flood of first guesses
        guess = pool.run(SUSPECT, self.work, "s")
        self.assertEqual((pool.running, pool.running_untrusted, pool.running_suspect, pool.queued), (2, 2, 0, 4))
        untrusted, trusted_side = pool.gauges(trusted=False), pool.gauges(trusted=True)
        self.assertEqual((untrusted.queued, untrusted.working, trusted_side.queued, trusted_side.working), (4, 2, 0, 0))
        trusted = pool.run(TRUSTED, self.work, "known", False)  # the third thread is free for it
        self.assertEqual((yield trusted), "known")
        self.assertEqual(self.order, ["known"])
        self.assertEqual((pool.running, pool.running_untrusted), (2, 2))
        self.gate.set()
        results = yield defer.gatherResults(fresh + [guess])
        self.assertEqual(results, ["c0", "c1", "c2", "c3", "c4", "s"])
        self.assertEqual((pool.running, pool.running_untrusted, pool.running_suspect, pool.queued), (0, 0, 0, 0))

    def test_limits_are_checked(self) -> None:
        with self.assertRaises(ValueError):
            HashPool(reactor, threads=2, untrusted_threads=0)
        pool = HashPool(reactor, threads=2, suspect_threads=3, untrusted_threads=2)
        self.assertEqual((pool.untrusted_threads, pool.suspect_threads), (2, 2))

    @defer.inlineCallbacks
    def test_untrusted_attempts_hash_at_the_lowest_priority_and_trusted_ones_do_not(self):
        import os
        import sys

        if not sys.platform.startswith("linux"):
            raise unittest.SkipTest("per-thread nice values are Linux's")

        def niceness() -> int:
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        clean, suspect, trusted = yield defer.gatherResults([
            self.pool.run(CLEAN, niceness), self.pool.run(SUSPECT, niceness), self.pool.run(TRUSTED, niceness)])
        self.assertEqual((clean, suspect), (19, 19))
        self.assertEqual(trusted, ours)
        self.assertEqual(os.getpriority(os.PRIO_PROCESS, 0), ours)  # the process (and its reactor) untouched
