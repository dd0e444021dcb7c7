"""A 12,000-message mailbox downloaded and deleted in one session by fetchmail and by getmail6.

Such a session sends 3-4 commands per message (fetchmail: ``LIST n``, ``RETR n``, ``DELE n``;
getmail: ``RETR n``, ``DELE n`` after ``UIDL`` and ``LIST``), well past the 10,000 commands that
``max_commands`` used to allow per connection: the client got ``-ERR Too many commands.`` and was
closed before QUIT, nothing was deleted, and every later run started over. With every protection
at its default (``prevent``), each client must now get every message exactly once, the Maildir
must be empty afterwards and the event file must hold no security event.

Delivery is kept cheap so the test stays fast: fetchmail appends to one BSMTP file (no MDA
process per message), getmail hands every message to a small LMTP sink in this process.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from tests.support import require_binary
from tests.support.clients import (
    Pop3Relay,
    _local_user,
    _private_env,
    _run,
    _write_private,
    lf_to_crlf,
)
from tests.support.messages import TestMessage, test_id_of, write_maildir
from tests.support.pop3shield_server import Pop3ShieldServer

COUNT = 12000
USER = "alice"
PASSWORD = "s3cret-pass"
#: seconds one client may take for the whole mailbox (measured: well under a minute)
CLIENT_TIMEOUT = 300


def big_messages(count: int = COUNT) -> tuple[TestMessage, ...]:
    def one(n: int) -> TestMessage:
        tid = f"big-{n:05d}"
        raw = (f"From: Alice Example <alice@example.test>\r\nTo: bob@example.test\r\n"
               f"Subject: message {n}\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
               f"Message-ID: <{tid}@pop3shield.test>\r\nX-Test-Id: {tid}\r\n\r\n"
               f"body of message {n}\r\n.leading dot\r\n").encode("ascii")
        return TestMessage(tid, raw, f"small message {n}")
    return tuple(one(n) for n in range(1, count + 1))


@pytest.fixture
def big_box(tmp_path):
    messages = big_messages()
    root = tmp_path / "mail"
    maildir = root / USER / "Maildir"
    write_maildir(maildir, messages, new_every=2)
    server = Pop3ShieldServer()
    server.start(tmp_path / "server", {USER: PASSWORD}, root)
    try:
        yield server, maildir, messages
    finally:
        server.stop()


def maildir_left(maildir: Path) -> list[str]:
    return sorted(p.name for sub in ("new", "cur") for p in (maildir / sub).iterdir())


def check_outcome(name: str, server: Pop3ShieldServer, maildir: Path, messages, got: list[bytes],
                  relay: Pop3Relay, elapsed: float) -> None:
    want = {m.test_id: m.wire for m in messages}
    ids = [test_id_of(m) for m in got]
    assert len(ids) == len(set(ids)) == COUNT, f"{name}: {len(ids)} delivered, {len(set(ids))} distinct"
    assert set(ids) == set(want)
    wrong = [tid for tid, data in zip(ids, got) if data != want[tid]]
    assert wrong == [], f"{name}: {len(wrong)} messages differ, e.g. {wrong[:3]}"
    assert maildir_left(maildir) == [], f"{name} left {len(maildir_left(maildir))} messages on the server"
    events = [e for e in server.events() if e.get("type") == "security"]
    assert events == [], f"{name} tripped a protection: {events[:3]}"
    sessions = relay.client_lines()
    assert len(sessions) == 1, f"{name} used {len(sessions)} sessions"
    [lines] = sessions
    verbs = [line.split(" ")[0].upper() for line in lines]
    assert verbs.count("DELE") == COUNT and verbs[-1] == "QUIT"
    assert len(lines) > 10000 + 50, f"{name}: only {len(lines)} commands, the test proves nothing"
    print(f"{name}: {COUNT} messages, {len(lines)} commands in one session, {elapsed:.1f} s")


# ------------------------------------------------------------------ fetchmail

def fetchmail_delete_all(host: str, port: int, home: Path) -> list[bytes]:
    """``fetchall``, no ``keep`` (so DELE), delivery appended to one BSMTP file."""
    fetchmail = require_binary("fetchmail")
    fmhome = home / "fetchmailhome"
    fmhome.mkdir(parents=True, exist_ok=True, mode=0o700)
    batch = home / "batch.bsmtp"
    rc = _write_private(home / "fetchmailrc", (
        "set no syslog\n"
        "set invisible\n"
        f"poll {host} with proto POP3 port {port} timeout 60\n"
        f"  user \"{USER}\" there with password \"{PASSWORD}\" is \"{_local_user()}\" here\n"
        "  options fetchall no rewrite sslproto '' no sslcertck\n"
        f"  bsmtp \"{batch}\"\n"))
    argv = [fetchmail, "--nodetach", "--fetchmailrc", str(rc), "--pidfile", str(fmhome / "fetchmail.pid")]
    _run(argv, env=_private_env(home, FETCHMAILHOME=str(fmhome)), timeout=CLIENT_TIMEOUT)
    return parse_bsmtp(batch.read_bytes())


def parse_bsmtp(data: bytes) -> list[bytes]:
    """The messages of a BSMTP batch: each ``DATA`` up to its lone ``.``, dots un-stuffed."""
    messages, current = [], None
    for line in data.replace(b"\r\n", b"\n").split(b"\n"):
        if current is None:
            if line == b"DATA":
                current = []
        elif line == b".":
            messages.append(lf_to_crlf(b"".join(part + b"\n" for part in current)))
            current = None
        else:
            current.append(line[1:] if line.startswith(b".") else line)
    return messages


def test_fetchmail_empties_a_12000_message_mailbox(big_box, tmp_path) -> None:
    server, maildir, messages = big_box
    home = tmp_path / "fetchmail-home"
    home.mkdir(mode=0o700)
    started = time.monotonic()
    with Pop3Relay(server.host, server.port) as relay:
        got = fetchmail_delete_all(relay.host, relay.port, home)
    check_outcome("fetchmail", server, maildir, messages, got, relay, time.monotonic() - started)


# ------------------------------------------------------------------ getmail6

class LmtpSink:
    """A minimal LMTP server on 127.0.0.1 that keeps the DATA of every message, un-dot-stuffed.

    getmail's Maildir and mbox destinations fork a child per message and miss its exit now and
    then (the SIGCHLD handler is installed after the fork): over 12,000 messages one of them
    waits out getmail's 60 s timeout and the run fails. Its ``MDA_lmtp`` destination does not
    fork, and is fast.
    """

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="lmtp-sink")

    def __enter__(self) -> LmtpSink:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            with conn, conn.makefile("rb") as reader:
                conn.settimeout(CLIENT_TIMEOUT)
                self._session(conn, reader)

    def _session(self, conn: socket.socket, reader) -> None:
        conn.sendall(b"220 lmtp-sink ready\r\n")
        for line in reader:
            verb = line[:4].upper()
            if verb == b"LHLO":
                conn.sendall(b"250-lmtp-sink\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                conn.sendall(b"354 go ahead\r\n")
                body = []
                for data in reader:
                    if data == b".\r\n":
                        break
                    body.append(data[1:] if data.startswith(b".") else data)
                self.messages.append(b"".join(body))
                conn.sendall(b"250 2.0.0 delivered\r\n")
            elif verb == b"QUIT":
                conn.sendall(b"221 bye\r\n")
                return
            else:  # MAIL, RCPT, RSET, NOOP
                conn.sendall(b"250 OK\r\n")


def getmail_delete_all(host: str, port: int, home: Path) -> list[bytes]:
    """``SimplePOP3Retriever`` with ``read_all`` and ``delete = true``, delivering over LMTP."""
    getmail = require_binary("getmail")
    rcdir = home / "getmail"
    rcdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with LmtpSink() as sink:
        rc = _write_private(rcdir / "getmailrc", (
            "[retriever]\n"
            "type = SimplePOP3Retriever\n"
            f"server = {host}\n"
            f"port = {port}\n"
            f"username = {USER}\n"
            f"password = {PASSWORD}\n"
            "timeout = 60\n"
            "\n[destination]\n"
            "type = MDA_lmtp\n"
            "host = 127.0.0.1\n"
            f"port = {sink.port}\n"
            "override = bob@example.test\n"
            "\n[options]\n"
            "read_all = true\n"
            "delete = true\n"
            "delivered_to = false\n"
            "received = false\n"
            "record_mailbox = false\n"
            "message_log_syslog = false\n"
            "verbose = 0\n"))
        _run([getmail, f"--getmaildir={rcdir}", f"--rcfile={rc}"], env=_private_env(home),
             timeout=CLIENT_TIMEOUT)
    return sink.messages


def test_getmail_empties_a_12000_message_mailbox(big_box, tmp_path) -> None:
    server, maildir, messages = big_box
    home = tmp_path / "getmail-home"
    home.mkdir(mode=0o700)
    started = time.monotonic()
    with Pop3Relay(server.host, server.port) as relay:
        got = getmail_delete_all(relay.host, relay.port, home)
    check_outcome("getmail", server, maildir, messages, got, relay, time.monotonic() - started)
