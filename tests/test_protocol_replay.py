"""The whole protocol with the session's replay of remembered replies and without it.

Two connections on copies of one Maildir get the same pipelined input, turn by turn of a
Clock that runs one reactor iteration at a time; one session replays remembered replies
(STAT, NOOP, LIST n, UIDL n), the other takes the whole way for every line. With a replay
costing a whole line of the turn's budget, the bytes on the wire after every turn and the
transport's reading state are the same; with the shell's budget (a replay costs a quarter of
a line) the turns are fewer and the bytes, in order, the same. The security events written,
the operational log lines and the metrics exposition are the same in both.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from twisted.logger import globalLogPublisher

from pop3shield.core.settings import Action, ProtectionSettings, ProtectionsConfig
from tests.test_protocol import connect, login, make_factory, mailroot, take  # noqa: F401 - a fixture
from tests.test_protocol_backpressure import TurnClock, logged_lines

__all__ = ["mailroot"]

BATCH = b"STAT\r\nLIST 1\r\nUIDL 1\r\nNOOP\r\n" * 25
STEPS = [
    BATCH, BATCH,
    b"DELE 1\r\n" + BATCH,
    b"LIST 9\r\nFOO\r\nSTAT\nNOOP\n" + BATCH,
    b"RSET\r\nSTAT\r\nLIST 1\r\n" + BATCH[:300],
    BATCH[300:] + b"UIDL 2\r\nLIST 2\r\n" * 30,
    b"QUIT\r\n",
]

DETECTING = ProtectionsConfig(max_commands=ProtectionSettings(Action.DETECT), commands_after_login=150,
                              commands_per_message=0, non_compliant=ProtectionSettings(Action.DETECT),
                              strict_crlf=True, max_bad_commands=ProtectionSettings(Action.DETECT),
                              bad_commands_limit=1)
PREVENTING = ProtectionsConfig(commands_after_login=420, commands_per_message=0)


def run(root: Path, protections: ProtectionsConfig | None, replay: bool, replays_per_line: int | None) -> dict:
    clock = TurnClock()
    lines: list[str] = []
    observer = logged_lines(lines)
    try:
        factory = make_factory(root, clock, protections)
        proto, transport = connect(factory)
        take(transport)
        login(proto, transport)
        proto.session.replay_replies = replay
        if replays_per_line is not None:
            proto.session.replays_per_line = replays_per_line
        wire = []
        for step in STEPS:
            if proto.session.closed:
                break
            proto.dataReceived(step)
            turns = [take(transport)]
            while any(call.getTime() <= clock.seconds() for call in clock.getDelayedCalls()):
                clock.turn()
                turns.append(take(transport))
                turns.append(transport.producerState.encode())
            wire.append(turns)
        proto.connectionLost(None)
    finally:
        globalLogPublisher.removeObserver(observer)
    events = []
    for line in (root / "events.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("session", None)
        events.append(record)
    remembered = len(proto.session._replies or {})
    factory.metrics.readings.analyzer = None  # the test's stand-in keeps no queue figures
    return {
        "wire": wire,
        "events": events,
        "log": [line.replace(proto.session_id, "<session>") for line in lines],
        "metrics": generate_latest(factory.metrics.registry).decode(),
        "remembered": remembered,
    }


@pytest.mark.parametrize("replays_per_line", [1, None], ids=["turn-by-turn", "shell-budget"])
@pytest.mark.parametrize("protections", [None, PREVENTING, DETECTING], ids=["default", "prevent", "detect"])
def test_the_replay_changes_nothing_on_the_wire_in_the_events_logs_or_metrics(
        mailroot: Path, tmp_path: Path, protections: ProtectionsConfig | None, replays_per_line: int | None) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(mailroot / "mail", copy / "mail")  # the same file names: the same UIDs
    fast = run(mailroot, protections, True, replays_per_line)
    slow = run(copy, protections, False, replays_per_line)
    assert fast["remembered"] > 0 and slow["remembered"] == 0  # the replay did run on one side only
    if replays_per_line == 1:
        assert fast["wire"] == slow["wire"]
    else:  # fewer turns, the same bytes in the same order
        def joined(wire: list) -> bytes:
            return b"".join(part for step in wire for part in step if part not in (b"paused", b"producing"))
        assert joined(fast["wire"]) == joined(slow["wire"])
        assert sum(map(len, fast["wire"])) < sum(map(len, slow["wire"]))
    for key in ("events", "log", "metrics"):
        assert fast[key] == slow[key], key
    assert b"+OK 2 58\r\n" in b"".join(fast["wire"][0])
    if protections is DETECTING:
        assert {e["protection"] for e in fast["events"] if e["type"] == "security"} >= {"max_commands", "non_compliant", "max_bad_commands"}
    if protections is PREVENTING:
        assert [e["protection"] for e in fast["events"] if e["type"] == "security"] == ["max_commands"]
