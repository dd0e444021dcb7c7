"""CPU cost of pipelined commands, without sockets: the core alone and the whole protocol.

    PYTHONPATH=$PWD python bench/pipeline_micro.py [--rounds 20] [--profile core|protocol]

Both parts feed what bench/perf.py's ``pipelining()`` sends: a session logs in to a maildrop
of 10 messages, then gets 10 writes of 100 commands (STAT, LIST 1, UIDL 1, NOOP cycling), the
replies of each batch taken before the next. The figures are CPU time (``time.process_time``)
per command, the median over the rounds, so other work on the machine moves them little.

* core: ``Session.receive_data`` with the real detector's fast tier, counted by a real
  :class:`~pop3shield.metrics.Metrics` the way the factory wraps it;
* protocol: ``POP3ServerProtocol.dataReceived`` on a StringTransport with the real Maildir
  backend (blocking work inline), the real event log and metrics, each batch run to its end
  through the reactor turns the protocol asks for (a Clock that runs one turn at a time).

Every reply is checked, so a faster figure is never a wrong answer.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not os.environ.get("PYTHONPATH"):  # PYTHONPATH names the tree to measure (another checkout, say)
    sys.path.insert(0, str(ROOT))

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse  # noqa: E402
from twisted.cred.portal import Portal  # noqa: E402
from twisted.internet import defer  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from pop3shield.backends.maildir import MaildirBackend  # noqa: E402
from pop3shield.core import actions as A  # noqa: E402
from pop3shield.core.session import Session  # noqa: E402
from tests.test_protocol_backpressure import TurnClock  # noqa: E402 (one reactor iteration per turn())
from pop3shield.core.settings import SessionSettings  # noqa: E402
from pop3shield.events import EventLog  # noqa: E402
from pop3shield.maildir import Maildir  # noqa: E402
from pop3shield.metrics import Metrics  # noqa: E402
from pop3shield.mcp import quick_check  # noqa: E402
from pop3shield.protocol import POP3ServerFactory  # noqa: E402
from pop3shield.realm import MaildirRealm  # noqa: E402

PIPELINE = 100
WRITES = 10
MESSAGES = 10
SIZE = 4096
COMMANDS = (b"STAT\r\n", b"LIST 1\r\n", b"UIDL 1\r\n", b"NOOP\r\n")
BATCH = b"".join(COMMANDS[i % 4] for i in range(PIPELINE))


class _Entry:
    __slots__ = ("key", "uid", "size")

    def __init__(self, key: str, uid: str, size: int) -> None:
        self.key, self.uid, self.size = key, uid, size


def _expected(uid1: str, size1: int, total: int) -> bytes:
    replies = (f"+OK {MESSAGES} {total}\r\n".encode(), f"+OK 1 {size1}\r\n".encode(),
               f"+OK 1 {uid1}\r\n".encode(), b"+OK\r\n")
    return b"".join(replies[i % 4] for i in range(PIPELINE))


# ---------------------------------------------------------------------------- the core alone

def core_round() -> float:
    """CPU seconds of WRITES batches through one logged-in session."""
    metrics = Metrics()
    session = Session(SessionSettings(hostname="bench.invalid"), "192.0.2.7",
                      quick_check=metrics.counting_quick_check(quick_check))
    session.turn_budget = None
    session.start()
    out = session.receive_data(b"USER pipe\r\nPASS secret-pw\r\n")
    assert isinstance(out[-1], A.Authenticate), out
    entries = [_Entry(f"k{n}", f"uid{n:06d}", SIZE) for n in range(MESSAGES)]
    session.login_succeeded(entries)
    expect = _expected(entries[0].uid, SIZE, SIZE * MESSAGES)
    started = time.process_time()
    for _ in range(WRITES):
        replies = session.receive_data(BATCH)
        data = b"".join(a.data for a in replies if isinstance(a, A.Send))
        if data != expect:
            raise AssertionError(f"core replies differ: {data[:80]!r}")
    return time.process_time() - started


# ---------------------------------------------------------------------------- the whole protocol

def _inline(function, *args):
    return defer.maybeDeferred(function, *args)


class _NoAnalysis:
    def analyze(self, arguments, source=None):
        raise AssertionError("no argument of the pipelined commands needs the slow tier")


def _make_root(root: Path) -> tuple[str, int]:
    (root / "mail" / "pipe").mkdir(parents=True)
    store = Maildir(root / "mail" / "pipe" / "Maildir", create=True)
    for n in range(MESSAGES):
        body = f"Subject: {n}\n\n".encode()
        store.deliver(body + b"x" * (SIZE - len(body) - 1) + b"\n")
    first = store.scan()[0]
    return first.uid, first.size


def protocol_round(root: Path, first: tuple[str, int]) -> tuple[float, int]:
    """CPU seconds of WRITES batches through one protocol, and the reactor turns they took."""
    clock = TurnClock()
    portal = Portal(MaildirRealm(str(root / "mail" / "{user}" / "Maildir")),
                    [InMemoryUsernamePasswordDatabaseDontUse(pipe=b"secret-pw")])
    factory = POP3ServerFactory(SessionSettings(hostname="bench.invalid"), MaildirBackend(portal, _inline),
                                EventLog(str(root / "events.jsonl"), clock=clock.seconds),
                                reactor=clock, analyzer=_NoAnalysis(), auth_failure_delay=0.0)
    address = IPv4Address("TCP", "192.0.2.7", 40000)
    proto = factory.buildProtocol(address)
    transport = StringTransport(peerAddress=address, hostAddress=IPv4Address("TCP", "127.0.0.1", 110))
    proto.makeConnection(transport)
    proto.dataReceived(b"USER pipe\r\nPASS secret-pw\r\n")
    login = transport.value()
    if b"Logged in" not in login:
        raise AssertionError(f"no login: {login!r}")
    transport.clear()
    total = first[1] * MESSAGES  # every message has the same size
    expect = _expected(first[0], first[1], total)
    turns = 0
    started = time.process_time()
    for _ in range(WRITES):
        proto.dataReceived(BATCH)
        while len(transport.value()) < len(expect) and clock.calls:
            clock.turn()
            turns += 1
        if transport.value() != expect:
            raise AssertionError(f"protocol replies differ: {transport.value()[:80]!r}")
        transport.clear()
    spent = time.process_time() - started
    proto.dataReceived(b"QUIT\r\n")
    proto.connectionLost(None)
    return spent, turns


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--profile", choices=("core", "protocol"), help="cProfile this part instead")
    args = parser.parse_args()
    commands = PIPELINE * WRITES
    with tempfile.TemporaryDirectory(prefix="pipe-micro-") as tmp:
        root = Path(tmp)
        first = _make_root(root)
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.rounds):
                core_round() if args.profile == "core" else protocol_round(root, first)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
            return 0
        core_round()
        protocol_round(root, first)  # warm up: imports, caches
        core = [core_round() for _ in range(args.rounds)]
        proto = [protocol_round(root, first) for _ in range(args.rounds)]
    core_us = statistics.median(core) / commands * 1e6
    proto_us = statistics.median(t for t, _ in proto) / commands * 1e6
    print(f"core      Session.receive_data     {core_us:6.2f} us CPU/command  "
          f"({1e6 / core_us:,.0f} commands/s of CPU)")
    print(f"protocol  dataReceived + turns     {proto_us:6.2f} us CPU/command  "
          f"({1e6 / proto_us:,.0f} commands/s of CPU), {proto[0][1] / WRITES:.1f} extra turns/batch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
