"""Real-client interoperability tests (see README.md in this directory).

Every test runs against each server kind (``dovecot``, ``pop3shield``).
"""

from __future__ import annotations

import contextlib
import poplib
import re
import socket
import struct
import time

import pytest

from tests.support import require_binary
from tests.support.clients import FETCHERS, Pop3Relay, curl_list
from tests.support.messages import TestMessage, messages_by_id, test_id_of

SOCKET_TIMEOUT = 30  # > Dovecot's 10 s pop3_lock_session wait


# --------------------------------------------------------------- helpers
def login(box, *, timeout: float = SOCKET_TIMEOUT) -> poplib.POP3:
    conn = poplib.POP3(box.host, box.port, timeout=timeout)
    try:
        conn.user(box.user)
        conn.pass_(box.password)
    except BaseException:
        conn.close()
        raise
    return conn


def login_when_free(box, *, within: float = 15.0) -> poplib.POP3:
    """Log in, retrying while the server still says [IN-USE].

    After QUIT or a dropped connection a server may release the mailbox a
    moment after the client has gone; that must not fail the test.
    """
    deadline = time.monotonic() + within
    while True:
        try:
            return login(box)
        except poplib.error_proto as exc:
            if b"[IN-USE]" not in exc.args[0] or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def lines_to_bytes(lines: list[bytes]) -> bytes:
    """poplib strips CRLF from each line; rebuild the wire form."""
    return b"".join(line + b"\r\n" for line in lines)


def expected_top(msg: TestMessage, n: int) -> bytes:
    """Header block + empty line + first *n* body lines, in wire form."""
    wire = msg.wire
    sep = wire.find(b"\r\n\r\n")
    assert sep >= 0, f"{msg.test_id} has no header/body separator"
    head, body = wire[: sep + 4], wire[sep + 4:]
    return head + b"".join(body.splitlines(keepends=True)[:n])


def first_difference(got: bytes, want: bytes) -> str:
    i = next((k for k in range(min(len(got), len(want))) if got[k] != want[k]),
             min(len(got), len(want)))
    return (f"lengths got={len(got)} want={len(want)}; first difference at offset {i}:\n"
            f"  got:  {got[max(0, i - 40): i + 40]!r}\n"
            f"  want: {want[max(0, i - 40): i + 40]!r}")


def assert_same_messages(got: list[bytes], box, what: str) -> list[str]:
    """Every stored message retrieved exactly once, byte-exactly; returns ids in order."""
    by_id = messages_by_id(box.messages)
    ids = [test_id_of(m) for m in got]
    problems = []
    missing = sorted(set(by_id) - set(ids))
    if missing:
        problems.append(f"missing messages: {missing}")
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        problems.append(f"retrieved more than once: {dupes}")
    for n, (data, tid) in enumerate(zip(got, ids), 1):
        if tid not in by_id:
            problems.append(f"message #{n}: unknown/missing X-Test-Id: {data[:120]!r}")
        elif data != by_id[tid].wire:
            problems.append(f"message #{n} ({tid}, {by_id[tid].description}) differs: "
                            + first_difference(data, by_id[tid].wire))
    assert not problems, f"{what} against {box.kind}:\n" + "\n".join(problems)
    return ids  # type: ignore[return-value]


def server_order(box) -> list[str]:
    """X-Test-Ids in the server's message-number order (via TOP n 0; cached on *box*)."""
    cached = getattr(box, "_server_order", None)
    if cached is None:
        conn = login_when_free(box)
        try:
            count, _ = conn.stat()
            cached = [test_id_of(lines_to_bytes(conn.top(i, 0)[1]))
                      for i in range(1, count + 1)]
            conn.quit()
        finally:
            conn.close()
        box._server_order = cached
    return cached


def stat_of(box) -> tuple[int, int]:
    conn = login_when_free(box)
    try:
        result = conn.stat()
        conn.quit()
        return result
    finally:
        conn.close()


def maildir_files(box) -> list[str]:
    return sorted(p.name for sub in ("cur", "new") for p in (box.maildir / sub).iterdir())


def uidl_map(conn: poplib.POP3) -> dict[int, bytes]:
    resp, lines, _ = conn.uidl()
    assert resp.startswith(b"+OK")
    out = {}
    for line in lines:
        num, uid = line.split(b" ", 1)
        out[int(num)] = uid
    return out


# ------------------------------------------------------- real clients
CLIENTS = ["poplib", "curl", "fetchmail", "mpop", "getmail"]


@pytest.mark.parametrize("client", CLIENTS)
def test_client_retrieves_every_message_byte_exact(shared_mailbox, client, client_home,
                                                   record_property):
    box = shared_mailbox
    binary, fetch = FETCHERS[client]
    if binary:
        require_binary(binary)
    with Pop3Relay(box.host, box.port) as relay:
        got = fetch(relay.host, relay.port, box.user, box.password, home=client_home)
    commands = relay.client_lines()
    record_property("pop3_commands", commands)
    record_property("pipelined", relay.pipelined_batches())
    (client_home.parent / "pop3-commands.txt").write_text(
        "\n".join(" | ".join(c) for c in commands) + "\n", encoding="utf-8")

    ids = assert_same_messages(got, box, client)
    assert ids == server_order(box), f"{client} did not store messages in server order"
    sent = [line.split(" ")[0].upper() for session in commands for line in session]
    assert "STLS" not in sent, f"{client} tried STLS: {commands}"
    assert "DELE" not in sent, f"{client} deleted messages although told to keep: {commands}"
    count, _ = stat_of(box)
    assert count == len(box.messages), f"{client} left {count} of {len(box.messages)}"


def test_curl_list_matches_sizes(shared_mailbox, client_home):
    box = shared_mailbox
    require_binary("curl")
    listing = curl_list(box.host, box.port, box.user, box.password, home=client_home)
    by_id = messages_by_id(box.messages)
    want = [(n, box.expected_size(by_id[tid])) for n, tid in enumerate(server_order(box), 1)]
    assert listing == want


# ------------------------------------------------------ poplib protocol
def test_stat_and_list(fresh_mailbox):
    box = fresh_mailbox
    conn = login(box)
    try:
        order = [test_id_of(lines_to_bytes(conn.top(i, 0)[1]))
                 for i in range(1, len(box.messages) + 1)]
        by_id = messages_by_id(box.messages)
        sizes = [box.expected_size(by_id[tid]) for tid in order]

        assert conn.stat() == (len(box.messages), sum(sizes))
        if not box.quirks.get("size_excludes_added_crlf"):
            assert conn.stat()[1] == sum(len(m.wire) for m in box.messages)

        resp, lines, _ = conn.list()
        assert resp.startswith(b"+OK")
        assert lines == [b"%d %d" % (n, s) for n, s in enumerate(sizes, 1)]
        for n, size in enumerate(sizes, 1):
            assert conn.list(n) == b"+OK %d %d" % (n, size)
        with pytest.raises(poplib.error_proto, match="-ERR"):
            conn.list(len(sizes) + 1)
        with pytest.raises(poplib.error_proto, match="-ERR"):
            conn.retr(len(sizes) + 1)
        conn.quit()
    finally:
        conn.close()


def test_retr_each_message(fresh_mailbox):
    box = fresh_mailbox
    conn = login(box)
    try:
        got = []
        for n in range(1, len(box.messages) + 1):
            resp, lines, _octets = conn.retr(n)
            assert resp.startswith(b"+OK"), resp
            got.append(lines_to_bytes(lines))
        conn.quit()
    finally:
        conn.close()
    assert_same_messages(got, box, "poplib RETR")


def test_uidl_stable_across_sessions(fresh_mailbox):
    box = fresh_mailbox
    maps = []
    for _session in range(2):
        conn = login_when_free(box)
        try:
            m = uidl_map(conn)
            for n, uid in m.items():
                assert conn.uidl(n) == b"+OK %d %s" % (n, uid)
            conn.quit()
        finally:
            conn.close()
        maps.append(m)
    first, second = maps
    assert sorted(first) == list(range(1, len(box.messages) + 1))
    assert first == second, "UIDLs changed between sessions"
    uids = list(first.values())
    assert len(set(uids)) == len(uids), f"duplicate UIDLs: {uids}"
    for uid in uids:  # RFC 1939: 1..70 characters in 0x21..0x7E
        assert re.fullmatch(rb"[\x21-\x7e]{1,70}", uid), uid


@pytest.mark.parametrize("lines", [0, 2])
def test_top(fresh_mailbox, lines):
    box = fresh_mailbox
    by_id = messages_by_id(box.messages)
    conn = login(box)
    try:
        for n in range(1, len(box.messages) + 1):
            resp, got_lines, _ = conn.top(n, lines)
            assert resp.startswith(b"+OK"), resp
            got = lines_to_bytes(got_lines)
            tid = test_id_of(got)
            assert tid in by_id, got[:200]
            want = expected_top(by_id[tid], lines)
            assert got == want, f"TOP {n} {lines} ({tid}): " + first_difference(got, want)
        conn.quit()
    finally:
        conn.close()


def test_dele_then_rset_keeps_everything(fresh_mailbox):
    box = fresh_mailbox
    before_files = maildir_files(box)
    conn = login(box)
    try:
        count, total = conn.stat()
        size1 = int(conn.list(1).split()[2])
        assert conn.dele(1).startswith(b"+OK")
        with pytest.raises(poplib.error_proto, match="-ERR"):
            conn.dele(1)  # already deleted
        with pytest.raises(poplib.error_proto, match="-ERR"):
            conn.retr(1)
        assert conn.stat() == (count - 1, total - size1)
        assert [line.split()[0] for line in conn.list()[1]] == \
            [b"%d" % n for n in range(2, count + 1)]
        assert conn.rset().startswith(b"+OK")
        assert conn.stat() == (count, total)
        assert conn.quit().startswith(b"+OK")
    finally:
        conn.close()
    assert stat_of(box) == (count, total)
    assert len(maildir_files(box)) == len(before_files)


def test_dele_then_quit_deletes_exactly_those(fresh_mailbox):
    box = fresh_mailbox
    conn = login(box)
    try:
        count, _ = conn.stat()
        uids = uidl_map(conn)
        doomed = {2, 5, count}  # includes the ~1 MB message (last)
        doomed_ids = {test_id_of(lines_to_bytes(conn.top(n, 0)[1])) for n in doomed}
        for n in sorted(doomed):
            assert conn.dele(n).startswith(b"+OK")
        assert conn.quit().startswith(b"+OK")
    finally:
        conn.close()

    conn = login_when_free(box)
    try:
        assert conn.stat()[0] == count - len(doomed)
        remaining = uidl_map(conn)
        assert sorted(remaining.values()) == sorted(u for n, u in uids.items() if n not in doomed)
        left_ids = {test_id_of(lines_to_bytes(conn.top(n, 0)[1])) for n in remaining}
        assert left_ids == {m.test_id for m in box.messages} - doomed_ids
        conn.quit()
    finally:
        conn.close()
    assert len(maildir_files(box)) == count - len(doomed)


@pytest.mark.parametrize("how", ["close", "reset"])
def test_dropped_connection_after_dele_deletes_nothing(fresh_mailbox, how):
    box = fresh_mailbox
    before = maildir_files(box)
    conn = login(box)
    count, total = conn.stat()
    uids = uidl_map(conn)
    for n in (1, 2, count):
        assert conn.dele(n).startswith(b"+OK")
    if how == "reset":  # RST instead of FIN
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.file.close()
        conn.sock.close()
    else:
        conn.close()  # no QUIT: shutdown + close

    conn = login_when_free(box)
    try:
        assert conn.stat() == (count, total)
        assert uidl_map(conn) == uids
        conn.quit()
    finally:
        conn.close()
    assert len(maildir_files(box)) == len(before)


def test_second_concurrent_login_gets_in_use(fresh_mailbox):
    """RFC 2449 [IN-USE] for a second session while the first holds the maildrop.

    Dovecot does this only with ``pop3_lock_session = yes`` (set by our
    fixture), and only after waiting ~10 s for the session lock; by default
    Dovecot allows concurrent POP3 sessions on one Maildir.
    """
    box = fresh_mailbox
    first = login(box)
    try:
        count, _ = first.stat()
        second = poplib.POP3(box.host, box.port, timeout=SOCKET_TIMEOUT)
        try:
            second.user(box.user)
            with pytest.raises(poplib.error_proto) as excinfo:
                second.pass_(box.password)
            assert excinfo.value.args[0].startswith(b"-ERR [IN-USE]"), excinfo.value.args[0]
        finally:
            with contextlib.suppress(OSError, poplib.error_proto):
                second.quit()
            second.close()
        # the first session is unaffected
        assert first.stat()[0] == count
        assert first.quit().startswith(b"+OK")
    finally:
        first.close()
    # and once it is gone, logging in works again
    conn = login_when_free(box)
    try:
        assert conn.stat()[0] == count
        conn.quit()
    finally:
        conn.close()
