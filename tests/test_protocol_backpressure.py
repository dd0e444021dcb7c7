"""The shell's turns, output cap, stalls and batching, on a StringTransport and a task.Clock.

The transport's part is played by hand: a real one pauses the connection's producer when its
buffer passes ``output_buffer_limit`` and resumes it when everything is sent; here the test
calls ``pauseProducing``/``resumeProducing`` on the producer the protocol registered.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher

from pop3shield.protocol import COMMANDS_PER_TURN, LISTING_OCTETS_PER_TURN, REPLAYS_PER_LINE
from tests.test_backpressure_e2e import write_maildir
from tests.test_protocol import connect, login, make_factory, mailroot, take  # noqa: F401 - a fixture

__all__ = ["mailroot"]


class TurnClock(Clock):
    """A Clock whose ``turn()`` runs only the calls due when it starts, as one iteration of a
    real reactor does (``Clock.advance`` would also run the calls those calls schedule)."""

    def turn(self) -> None:
        due = [call for call in self.calls if call.getTime() <= self.seconds()]
        for call in due:
            self.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)


class Writes:
    """Counts the transport's writes."""

    def __init__(self, transport) -> None:
        self.count = 0
        self._write = transport.write

        def write(data: bytes) -> None:
            self.count += 1
            self._write(data)
        transport.write = write


def logged_lines(into: list[str]):
    def observer(event) -> None:
        if event.get("log_level") in (LogLevel.info, LogLevel.warn) and "log_format" in event:
            from twisted.logger import formatEvent
            into.append(formatEvent(event))
    globalLogPublisher.addObserver(observer)
    return observer


RSET_REPLY = b"+OK 2 messages (58 octets).\r\n"  # RSET is never answered from a remembered reply


def test_pipelined_commands_run_a_turn_at_a_time_each_turn_one_write(mailroot: Path) -> None:
    clock = TurnClock()
    proto, transport = connect(make_factory(mailroot, clock))
    login(proto, transport)
    writes = Writes(transport)
    proto.dataReceived(b"RSET\r\n" * 100)
    first = take(transport)
    assert first == RSET_REPLY * COMMANDS_PER_TURN  # a read is a turn: a whole budget
    assert writes.count == 1  # the replies of one turn: one write
    assert transport.producerState == "paused"  # input waits while commands are pending
    seen = len(first) // len(RSET_REPLY)
    while seen < 100:
        clock.turn()
        out = take(transport)
        assert out == RSET_REPLY * min(COMMANDS_PER_TURN, 100 - seen)
        seen += len(out) // len(RSET_REPLY)
    assert writes.count == 4  # 32 + 32 + 32 + 4
    assert transport.producerState == "producing"
    assert clock.getDelayedCalls() == [] or all(c.getTime() > 1 for c in clock.getDelayedCalls())


def test_replayed_replies_cost_a_quarter_of_a_line_of_the_turn(mailroot: Path) -> None:
    """NOOP, STAT, LIST n, UIDL n answered again from a remembered reply: REPLAYS_PER_LINE of
    them cost one line of a turn's budget, so a turn stays bounded (at most 4 x 32 of them)
    while a client's 100 pipelined small commands are one turn and one write."""
    clock = TurnClock()
    proto, transport = connect(make_factory(mailroot, clock))
    login(proto, transport)
    writes = Writes(transport)
    proto.dataReceived(b"NOOP\r\n" * 100)
    assert take(transport) == b"+OK\r\n" * 100 and writes.count == 1
    assert transport.producerState == "producing"
    assert all(c.getTime() > 1 for c in clock.getDelayedCalls())  # no turn waiting
    proto.dataReceived(b"NOOP\r\n" * 600)
    turns = [len(take(transport)) // 5]
    assert transport.producerState == "paused"
    while sum(turns) < 600:
        clock.turn()
        turns.append(len(take(transport)) // 5)
    most = COMMANDS_PER_TURN * REPLAYS_PER_LINE
    # the quarter lines left over from a turn are carried into the next: within a line of the budget
    assert all(most - REPLAYS_PER_LINE < n <= most for n in turns[:-1]) and 0 < turns[-1] <= most
    assert len(turns) == 5 and writes.count == 1 + len(turns)
    # whole-way lines and replays share the budget: a RSET (the whole way) forgets, the NOOP
    # after it takes the whole way too, and the two replays after that cost a quarter each
    proto.dataReceived((b"RSET\r\n" + b"NOOP\r\n" * 3) * 30)
    first = take(transport)
    rsets, noops = first.count(RSET_REPLY), first.count(b"+OK\r\n")
    assert rsets in (12, 13) and rsets * 3 - 2 <= noops <= rsets * 3 + 2
    assert 2 * rsets + (noops - rsets) / REPLAYS_PER_LINE <= COMMANDS_PER_TURN + 1


def test_no_command_runs_while_the_client_has_not_taken_its_output(mailroot: Path) -> None:
    clock = Clock()
    proto, transport = connect(make_factory(mailroot, clock, write_stall_timeout=30.0))
    login(proto, transport)
    out = transport.producer  # the connection's producer, registered with the transport
    out.pauseProducing()  # the transport holds more than the cap
    proto.dataReceived(b"STAT\r\nNOOP\r\n")
    clock.advance(0)
    assert take(transport) == b""
    assert transport.producerState == "paused"
    clock.advance(29)
    out.resumeProducing()  # everything was sent
    clock.advance(0)
    assert take(transport) == b"+OK 2 58\r\n+OK\r\n"
    assert transport.producerState == "producing"
    clock.advance(60)  # the stall timer went with the resumption
    assert not transport.disconnecting


def test_a_client_that_takes_nothing_is_aborted_mid_retr(mailroot: Path) -> None:
    clock = Clock()
    lines: list[str] = []
    observer = logged_lines(lines)
    try:
        proto, transport = connect(make_factory(mailroot, clock, write_stall_timeout=5.0))
        login(proto, transport)
        transport.producer.pauseProducing()
        proto.dataReceived(b"RETR 1\r\n")  # in flight: it keeps nothing alive
        clock.advance(4.9)
        assert not transport.disconnecting
        clock.advance(0.2)
        assert transport.disconnected  # abortConnection
        assert [line for line in lines if "took no output for 5 s" in line] != []
    finally:
        globalLogPublisher.removeObserver(observer)


def test_a_closing_connection_gets_the_grace_then_is_aborted(mailroot: Path) -> None:
    clock = Clock()
    lines: list[str] = []
    observer = logged_lines(lines)
    try:
        proto, transport = connect(make_factory(mailroot, clock, write_stall_timeout=5.0))
        login(proto, transport)
        proto.dataReceived(b"QUIT\r\n")
        assert take(transport) == b"+OK Logging out.\r\n"
        assert transport.disconnecting and not transport.disconnected
        assert transport.producer is None  # unregistered first: a TLS transport waits for that
        clock.advance(5.1)
        assert transport.disconnected
        assert len([line for line in lines if "not flushed 5 s after closing" in line]) == 1
    finally:
        globalLogPublisher.removeObserver(observer)


def test_a_client_that_leaves_leaves_no_turn_listing_or_timer(mailroot: Path) -> None:
    clock = Clock()
    proto, transport = connect(make_factory(mailroot, clock))
    login(proto, transport)
    proto.dataReceived(b"NOOP\r\n" * 100)
    transport.producer.pauseProducing()  # a stall timer, and a turn waiting
    proto.connectionLost(None)
    take(transport)
    assert [c for c in clock.getDelayedCalls() if c.active()] == []
    clock.advance(0)
    assert take(transport) == b""


def test_a_large_listing_goes_out_a_bounded_amount_per_turn_and_stops_when_paused(tmp_path: Path) -> None:
    count = 2500
    listed = write_maildir(tmp_path / "mail" / "alice" / "Maildir", count)
    clock = TurnClock()
    proto, transport = connect(make_factory(tmp_path, clock))
    proto.dataReceived(b"USER alice\r\nPASS secret-pw\r\n")
    assert take(transport).endswith(b"messages (%d octets).\r\n" % sum(size for _, size in listed))
    proto.dataReceived(b"UIDL\r\nNOOP\r\n")
    received = take(transport)
    assert 0 < len(received) <= LISTING_OCTETS_PER_TURN + 32 * 1024
    transport.producer.pauseProducing()
    clock.turn()
    assert take(transport) == b""  # paused: no chunk is made
    transport.producer.resumeProducing()
    turns = 0
    while not received.endswith(b"\r\n.\r\n+OK\r\n"):
        clock.turn()
        piece = take(transport)
        assert len(piece) <= LISTING_OCTETS_PER_TURN + 32 * 1024
        received += piece
        turns += 1
        assert turns < 100
    assert turns >= 1
    lines = received.split(b"\r\n")
    assert lines[0] == b"+OK %d messages" % count
    assert lines[1:count + 1] == [b"%d %s" % (n, uid.encode()) for n, (uid, _) in enumerate(listed, 1)]
    assert lines[count + 1:] == [b".", b"+OK", b""]


def test_replies_are_written_before_any_action_that_is_not_a_reply(mailroot: Path) -> None:
    """Batching never reorders: an action such as STARTTLS sees every earlier reply on the wire."""
    from pop3shield.core import actions as A

    class Marker:
        pass

    proto, transport = connect(make_factory(mailroot, TurnClock()))
    take(transport)
    seen: list[bytes] = []
    proto._do_Marker = lambda action: seen.append(transport.value())  # as a STARTTLS would run
    writes = Writes(transport)
    proto._run([A.Send(b"+OK one\r\n"), A.Send(b"+OK two\r\n"), Marker(), A.Send(b"+OK three\r\n")])
    assert seen == [b"+OK one\r\n+OK two\r\n"]
    assert take(transport) == b"+OK one\r\n+OK two\r\n+OK three\r\n"
    assert writes.count == 2


def test_a_producer_that_refills_the_output_as_it_resumes_keeps_the_stall_timer(mailroot: Path) -> None:
    """A backend producer may write at once when resumed (a chunk already in the page cache) and
    fill the buffer again before the resumption returns: that pause must keep its stall timer."""
    clock = Clock()
    proto, transport = connect(make_factory(mailroot, clock, write_stall_timeout=5.0))
    login(proto, transport)
    out = transport.producer  # the connection's output

    class Refill:
        resumed = 0

        def resumeProducing(self) -> None:
            self.resumed += 1
            out.write(b"x" * 10)
            out.pauseProducing()  # the transport: more than the cap waits again

        def pauseProducing(self) -> None:
            pass

        def stopProducing(self) -> None:
            pass

    producer = Refill()
    out.registerProducer(producer, True)
    out.pauseProducing()
    clock.advance(4)
    out.resumeProducing()  # drained: progress, so the timer starts over; and full again at once
    assert producer.resumed == 1 and out.paused
    clock.advance(4.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnected  # the client took nothing for 5 s after the refill
