"""The slow tier's scheduler: verdicts in order, shared fairly by source network, bounded in room and time.

A slow fake deep check (blocked on an Event) stands for the detector, so the tests decide when
a worker is free; the end-to-end flood test (test_fair_analysis_e2e.py) runs the real detector.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from pop3shield.analysis import Analyzer, source_key
from pop3shield.mcp import Verdict


class Gate:
    """A deep check that records the order it runs arguments in and blocks until opened."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.ran: list[bytes] = []
        self.lock = threading.Lock()

    def __call__(self, argument: bytes) -> Verdict:
        self.open.wait(10)
        with self.lock:
            self.ran.append(argument)
        return Verdict(False, ())


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
        verdicts = yield analyzer.analyze([b"\x90\x90", b"hello", b"\x90"], "192.0.2.1")
        self.assertEqual([v.malicious for v in verdicts], [True, False, True])
        self.assertNotIn(threading.current_thread().name, threads)
        self.assertEqual(analyzer.pending, 0)

    @defer.inlineCallbacks
    def test_a_source_past_its_share_is_refused_at_once_and_others_still_queue(self) -> Any:
        gate = Gate()
        analyzer = self.make(gate, threads=1, max_pending=8, source_queue=2, wait=30)
        flood = [analyzer.analyze([b"flood%d" % i], "192.0.2.%d" % (i + 1)) for i in range(3)]  # one /24
        # one runs, two queue: the source's share is full, so its fourth is refused without waiting
        refused = yield analyzer.analyze([b"flood3", b"flood3b"], "192.0.2.77")
        self.assertEqual(refused, [None, None])
        self.assertEqual(analyzer.refused_by["share"], 1)
        honest = analyzer.analyze([b"honest"], "198.51.100.7")
        self.assertFalse(honest.called)
        self.assertEqual(analyzer.pending, 4)
        gate.open.set()
        results = yield defer.gatherResults([*flood, honest])
        self.assertTrue(all(r[0] is not None for r in results))
        self.assertEqual(analyzer.pending, 0)

    @defer.inlineCallbacks
    def test_sources_are_served_round_robin_not_first_come(self) -> Any:
        gate = Gate()
        analyzer = self.make(gate, threads=1, max_pending=32, source_queue=8, wait=30)
        busy = analyzer.analyze([b"A0"], "203.0.113.1")
        flood = [analyzer.analyze([b"A%d" % i], "203.0.113.1") for i in range(1, 5)]
        late = [analyzer.analyze([b"B1"], "198.51.100.1"), analyzer.analyze([b"C1"], "2001:db8::1")]
        gate.open.set()
        yield defer.gatherResults([busy, *flood, *late])
        # B and C arrived after four queued A's, and are served right after the A that was running
        self.assertLess(gate.ran.index(b"B1"), gate.ran.index(b"A3"))
        self.assertLess(gate.ran.index(b"C1"), gate.ran.index(b"A3"))

    @defer.inlineCallbacks
    def test_one_source_holds_at_most_its_share_of_the_workers(self) -> Any:
        gate = Gate()
        analyzer = self.make(gate, threads=4, max_pending=32, source_queue=8, wait=30)
        flood = [analyzer.analyze([b"A%d" % i], "203.0.113.9") for i in range(6)]
        self.assertEqual(analyzer.running, 2)  # max(1, 4 // 2)
        other = analyzer.analyze([b"B"], "198.51.100.9")
        self.assertEqual(analyzer.running, 3)  # a free worker for the other source at once
        gate.open.set()
        yield defer.gatherResults([*flood, other])

    @defer.inlineCallbacks
    def test_a_saturated_tier_refuses_after_the_bounded_wait(self) -> Any:
        gate = Gate()
        analyzer = self.make(gate, threads=1, max_pending=8, source_queue=8, wait=0.3)
        running = analyzer.analyze([b"long"], "192.0.2.1")
        started = reactor.seconds()
        waiting = yield analyzer.analyze([b"x"], "198.51.100.1")
        waited = reactor.seconds() - started
        self.assertEqual(waiting, [None])
        self.assertGreaterEqual(waited, 0.25)
        self.assertLess(waited, 5.0)
        self.assertEqual(analyzer.refused_by["wait"], 1)
        gate.open.set()
        yield running

    @defer.inlineCallbacks
    def test_a_full_queue_makes_room_for_a_new_source_at_the_floods_expense(self) -> Any:
        gate = Gate()
        analyzer = self.make(gate, threads=1, max_pending=4, source_queue=4, wait=30)
        running = analyzer.analyze([b"A0"], "203.0.113.1")
        queued = [analyzer.analyze([b"A%d" % i], "203.0.113.1") for i in range(1, 5)]
        self.assertEqual(analyzer.queued, 4)
        honest = analyzer.analyze([b"B"], "198.51.100.1")
        self.assertEqual(analyzer.queued, 4)
        dropped = yield queued[-1]  # the flood's newest gave its place
        self.assertEqual(dropped, [None])
        self.assertEqual(analyzer.refused_by["full"], 1)
        # a second request of the same flood source finds no room: nobody holds more than it
        again = yield analyzer.analyze([b"A9"], "203.0.113.1")
        self.assertEqual(again, [None])
        gate.open.set()
        verdict = yield honest
        self.assertIsNotNone(verdict[0])
        yield defer.gatherResults([running, *queued[:-1]])

    @defer.inlineCallbacks
    def test_a_cancelled_request_leaves_the_queue(self) -> Any:
        gate = Gate()
        analyzer = self.make(gate, threads=1, max_pending=4, source_queue=4, wait=30)
        running = analyzer.analyze([b"A0"], "203.0.113.1")
        gone = analyzer.analyze([b"gone"], "203.0.113.1")
        self.assertEqual(analyzer.queued, 1)
        gone.addErrback(lambda f: f.trap(defer.CancelledError))
        gone.cancel()
        self.assertEqual(analyzer.queued, 0)
        gate.open.set()
        yield running
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertNotIn(b"gone", gate.ran)
        self.assertEqual(analyzer.pending, 0)

    def test_refusals_are_logged_rate_limited_and_reported(self) -> None:
        clock = task.Clock()
        reasons: list[str] = []
        analyzer = Analyzer(clock, threads=1, max_pending=1, source_queue=1, deep_check=Gate(),
                            on_refused=reasons.append)
        analyzer._start = lambda job: None  # type: ignore[method-assign]  # never runs: only admission
        analyzer.running = 1
        from twisted.logger import globalLogPublisher

        lines: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(lines.append)
        self.addCleanup(globalLogPublisher.removeObserver, lines.append)
        analyzer.analyze([b"q"], "192.0.2.1")
        for _ in range(5):
            analyzer.analyze([b"x"], "192.0.2.1")
        clock.advance(11)  # the queued one's wait is over, and so is the log line's interval
        self.assertEqual(reasons, ["share"] * 5 + ["wait"])
        self.assertEqual(analyzer.refused, 6)
        capacity = [e for e in lines if "analysis at capacity" in e.get("log_format", "")]
        self.assertEqual([e["count"] for e in capacity], [1, 5])  # one line, then one for the next five


@pytest.mark.parametrize(("address", "v4", "v6", "key"), [
    ("192.0.2.77", 24, 64, "192.0.2.0/24"),
    ("192.0.2.77", 32, 64, "192.0.2.77/32"),
    ("::ffff:192.0.2.77", 24, 64, "192.0.2.0/24"),
    ("2001:db8:1:2:3:4:5:6", 24, 64, "2001:db8:1:2::/64"),
    ("2001:db8:1:2:3:4:5:6", 24, 48, "2001:db8:1::/48"),
    (None, 24, 64, "-"),
    ("/run/pop3.sock", 24, 64, "/run/pop3.sock"),
])
def test_source_key_collapses_to_the_network(address: Any, v4: int, v6: int, key: str) -> None:
    assert source_key(address, v4, v6) == key


def test_refusals_by_reason_reach_the_metrics() -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from pop3shield.metrics import Metrics

    clock = task.Clock()
    analyzer = Analyzer(clock, threads=1, max_pending=2, source_queue=1, wait=1.0, deep_check=Gate())
    analyzer._start = lambda job: None  # type: ignore[method-assign]  # admission only
    analyzer.running = 1
    analyzer.analyze([b"q"], "192.0.2.1")
    analyzer.analyze([b"x"], "192.0.2.1")  # past its share
    clock.advance(1.5)  # the queued one waited too long
    metrics = Metrics()
    metrics.watch(analyzer=analyzer)
    found = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
             for s in family.samples}
    assert found[("pop3shield_analysis_refusals_total", (("reason", "share"),))] == 1
    assert found[("pop3shield_analysis_refusals_total", (("reason", "wait"),))] == 1
    assert found[("pop3shield_analysis_refusals_total", (("reason", "full"),))] == 0
    assert found[("pop3shield_analysis_refused_total", ())] == 2
    assert found[("pop3shield_analysis_queue_depth", ())] == 1  # the one "running"


def test_a_client_that_leaves_gives_up_its_queued_analysis(tmp_path: Any) -> None:
    """The protocol cancels the analysis of a connection that is gone: it leaves the queue, and its
    place goes to the next client; nothing is logged as a failure and nothing answers the dead session."""
    from tests.test_protocol import connect, make_factory, take

    clock = task.Clock()
    analyzer = Analyzer(clock, threads=1, max_pending=4, source_queue=4, deep_check=Gate())
    analyzer._start = lambda job: None  # type: ignore[method-assign]  # the worker stays busy
    analyzer.running = 1
    (tmp_path / "mail").mkdir()
    factory = make_factory(tmp_path, clock, auth_failure_delay=0.0, auth_failure_delay_max=0.0)
    factory.analyzer = analyzer
    factory.quick_check = lambda argument, field: None  # everything goes to the slow tier
    from twisted.logger import globalLogPublisher

    failures: list[dict[str, Any]] = []
    observer = lambda event: failures.append(event) if "log_failure" in event else None  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        proto, transport = connect(factory)
        take(transport)
        proto.dataReceived(b"USER alice\r\n")
        assert analyzer.queued == 1 and take(transport) == b""
        proto.connectionLost(None)
        assert analyzer.queued == 0 and analyzer.refused == 0
        clock.advance(10)  # no wait-refusal for it later either
        assert analyzer.refused == 0 and transport.value() == b""
    finally:
        globalLogPublisher.removeObserver(observer)
    assert failures == []


def test_the_detectors_pool_makes_its_emulators_when_it_starts() -> None:
    """The first long argument of each thread must not pay for creating the emulators."""
    emulate = pytest.importorskip("pop3shield.mcp.emulate")
    if not emulate.AVAILABLE:
        pytest.skip("unicorn is not installed")
    with emulate._spare_lock:
        emulate._spare.clear()
    analyzer = Analyzer(reactor, threads=3)
    analyzer.start()
    try:
        done = threading.Event()
        analyzer.pool.callInThread(done.set)  # queued behind the warm-up in a pool of its own
        assert done.wait(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with emulate._spare_lock:
                if len(emulate._spare) >= 3:
                    break
            time.sleep(0.05)
        with emulate._spare_lock:
            assert len(emulate._spare) >= 3
    finally:
        analyzer.stop()


def test_a_fake_check_makes_no_emulators() -> None:
    emulate = pytest.importorskip("pop3shield.mcp.emulate")
    with emulate._spare_lock:
        emulate._spare.clear()
    analyzer = Analyzer(reactor, threads=2, deep_check=lambda argument: None)
    analyzer.start()
    analyzer.stop()
    with emulate._spare_lock:
        assert emulate._spare == []
