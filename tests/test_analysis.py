"""The slow tier's thread pool: verdicts in order, and fail-closed ``None`` when it is full."""

from __future__ import annotations

import threading
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial import unittest

from pop3shield.analysis import Analyzer
from pop3shield.mcp import Verdict


class AnalyzerTests(unittest.TestCase):
    def make(self, deep_check: Any, **kwargs: Any) -> Analyzer:
        analyzer = Analyzer(reactor, deep_check=deep_check, **kwargs)
        analyzer.start()
        self.addCleanup(analyzer.stop)
        return analyzer

    @defer.inlineCallbacks
    def test_verdicts_come_back_in_order_from_a_worker_thread(self) -> Any:
        threads: list[str] = []

        def check(argument: bytes) -> Verdict:
            threads.append(threading.current_thread().name)
            return Verdict(argument.startswith(b"\x90"), ("test",))

        analyzer = self.make(check)
        verdicts = yield analyzer.analyze([b"\x90\x90", b"hello", b"\x90"])
        self.assertEqual([v.malicious for v in verdicts], [True, False, True])
        self.assertNotIn(threading.current_thread().name, threads)
        self.assertEqual(analyzer.pending, 0)

    @defer.inlineCallbacks
    def test_full_pool_answers_none_at_once(self) -> Any:
        release = threading.Event()

        def slow(argument: bytes) -> Verdict:
            release.wait(10)
            return Verdict(False, ())

        analyzer = self.make(slow, max_pending=2)
        first = analyzer.analyze([b"a" * 50])
        second = analyzer.analyze([b"b" * 50])
        third = yield analyzer.analyze([b"c" * 50, b"d" * 50])
        self.assertEqual(third, [None, None])
        self.assertEqual(analyzer.refused, 1)
        release.set()
        results = yield defer.gatherResults([first, second])
        self.assertEqual([[v.malicious for v in r] for r in results], [[False], [False]])
        self.assertEqual(analyzer.pending, 0)
        again = yield analyzer.analyze([b"e" * 50])
        self.assertEqual([v.malicious for v in again], [False])
