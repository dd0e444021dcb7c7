"""Issue 10: an absolute deadline before login (Dovecot's 180 s), besides the idle timeout.

The idle timeout restarts on every byte, so a client sending one byte a second could stay
logged out forever and hold a connection place; the deadline drops it whatever it sends, with
Dovecot's text and a log line. A session that logged in in time is not touched by it.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from tests.support.pop3shield_server import Pop3ShieldServer

DEADLINE = 2.0


def test_a_client_trickling_bytes_is_dropped_at_the_login_deadline(tmp_path: Path) -> None:
    server = Pop3ShieldServer(server_toml=f"login_deadline = {DEADLINE}\nlogin_timeout = 60")
    host, port = server.start(tmp_path / "srv", {"alice": "alice-secret"}, tmp_path / "mail")
    try:
        started = time.monotonic()
        slow = socket.create_connection((host, port), timeout=30)
        reader = slow.makefile("rb")
        assert reader.readline().startswith(b"+OK")
        slow.settimeout(0.3)
        received = b""
        sent = 0
        while time.monotonic() - started < DEADLINE + 20:
            try:
                slow.sendall(b"CAPA\r\n"[sent % 6:sent % 6 + 1])  # one byte every 0.3 s: never idle
                sent += 1
            except OSError:
                break
            try:
                chunk = slow.recv(4096)
            except socket.timeout:
                continue
            if not chunk:
                break
            received += chunk
        dropped = time.monotonic() - started
        slow.close()
        # a logged-in session outlives the deadline
        honest = socket.create_connection((host, port), timeout=30)
        lines = honest.makefile("rb")
        lines.readline()
        honest.sendall(b"USER alice\r\nPASS alice-secret\r\n")
        assert lines.readline() == b"+OK\r\n"
        assert lines.readline().startswith(b"+OK Logged in")
        time.sleep(DEADLINE + 0.5)
        honest.sendall(b"NOOP\r\nQUIT\r\n")
        assert lines.readline() == b"+OK\r\n"
        assert lines.readline().startswith(b"+OK")
        honest.close()
    finally:
        server.stop()
    assert received.endswith(b"-ERR Disconnected for inactivity.\r\n"), received
    assert DEADLINE - 0.1 <= dropped < DEADLINE + 10, dropped
    assert sent >= 5  # it really kept sending
    log = server.log_path.read_text(encoding="utf-8")
    assert f"not logged in within {DEADLINE:g} s: disconnected" in log
    assert "closed (login deadline)" in log
