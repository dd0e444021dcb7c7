"""A 200 MB message through a real server: exact bytes, bounded memory, a slow reader stalls nothing."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.pop3shield_server import Pop3ShieldServer
from tests.support.raw import PASSWORD, Client

LINE = b"0123456789" * 9 + b"\n"  # 91 octets, LF only: the server turns every line into CRLF
LINES = 200 * 1024 * 1024 // len(LINE)
DOT_EVERY = 1000


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def write_big_message(path: Path) -> tuple[int, str]:
    """Writes the file; returns the wire size and the SHA-256 of the unstuffed CRLF message."""
    digest = hashlib.sha256()
    block_lines = [b"." + LINE if i % DOT_EVERY == 0 else LINE for i in range(DOT_EVERY)]
    block = b"".join(block_lines)
    wire_block = block.replace(b"\n", b"\r\n")
    header = b"Subject: big\n\n"
    size = len(header) + 2
    digest.update(header.replace(b"\n", b"\r\n"))
    with open(path, "wb") as handle:
        handle.write(header)
        for _ in range(LINES // DOT_EVERY):
            handle.write(block)
            digest.update(wire_block)
            size += len(wire_block)
    return size, digest.hexdigest()


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pop3ShieldServer, int, str]]:
    tmp = tmp_path_factory.mktemp("big")
    maildir = tmp / "mail" / "alice" / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    size, digest = write_big_message(maildir / "cur" / "1700000000.M1P1.big:2,S")
    server = Pop3ShieldServer()
    server.start(tmp / "run", {"alice": PASSWORD}, tmp / "mail")
    try:
        yield server, size, digest
    finally:
        server.stop()


def read_message(client: Client, pause_after: int, pause: float, pid: int) -> tuple[bytes, int, int]:
    """Reads RETR's body, unstuffing; returns its digest, the peak RSS seen and the octets read."""
    digest = hashlib.sha256()
    peak = 0
    pending, client.buffer = client.buffer, b""
    received = len(pending)
    paused = False
    while True:
        chunk = client.sock.recv(1 << 20)
        assert chunk, "connection closed mid-message"
        received += len(chunk)
        pending += chunk
        lines = pending.split(b"\r\n")
        pending = lines.pop()
        for line in lines:
            if line == b".":
                assert pending == b""
                return digest.hexdigest().encode(), peak, received
            digest.update((line[1:] if line.startswith(b".") else line) + b"\r\n")
        if received >= pause_after and not paused:
            paused = True
            time.sleep(pause)  # a slow reader: the server must stop reading the file, not buffer it
            peak = max(peak, rss_kib(pid))
        if received % (16 << 20) < len(chunk):
            peak = max(peak, rss_kib(pid))


def test_200_mb_retr_is_exact_and_costs_little_memory(big) -> None:
    server, size, digest = big
    pid = server.proc.pid
    client = Client(server)
    client.login()
    client.send(b"LIST 1\r\n")
    assert client.line() == f"+OK 1 {size}\r\n".encode()
    baseline = rss_kib(pid)
    client.sock.settimeout(60)
    client.send(b"RETR 1\r\n")
    assert client.line() == f"+OK {size} octets\r\n".encode()
    got, peak, received = read_message(client, 8 << 20, 1.5, pid)
    assert got == digest.encode()
    assert received > size  # dot-stuffing added octets
    growth_mib = (peak - baseline) / 1024
    assert growth_mib < 16, f"server memory grew by {growth_mib:.1f} MiB while streaming 200 MB"
    client.send(b"QUIT\r\n")
    assert client.line() == b"+OK Logging out.\r\n"
    client.close()


# -- a message that changes after login -----------------------------------------------

SMALL = b"Subject: small\n\ntwenty octets\n"
BIG_LINE = b"a line of a big message, LF only\n"
BIG_LINES = (32 << 20) // len(BIG_LINE)
CHANGED_USERS = ("longer", "shorter", "replaced", "grows", "shrinks")


@pytest.fixture(scope="module")
def changing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pop3ShieldServer, Path]]:
    tmp = tmp_path_factory.mktemp("changing")
    root = tmp / "mail"
    for user in CHANGED_USERS:
        cur = root / user / "Maildir" / "cur"
        cur.mkdir(parents=True)
        for sub in ("new", "tmp"):
            (root / user / "Maildir" / sub).mkdir()
        with open(cur / "1700000000.M1P1.m:2,S", "wb") as handle:
            if user in ("grows", "shrinks"):
                handle.write(b"Subject: big\n\n")
                for _ in range(BIG_LINES // 1024):
                    handle.write(BIG_LINE * 1024)
            else:
                handle.write(SMALL)
    server = Pop3ShieldServer()
    server.start(tmp / "run", {user: PASSWORD for user in CHANGED_USERS}, root)
    try:
        yield server, root
    finally:
        server.stop()


def message_file(root: Path, user: str) -> Path:
    return root / user / "Maildir" / "cur" / "1700000000.M1P1.m:2,S"


def nothing_more(client: Client) -> bool:
    """No octet beyond what was read arrives within a short wait."""
    client.sock.settimeout(0.3)
    try:
        extra = client.sock.recv(65536)
    except TimeoutError:
        extra = b""
    finally:
        client.sock.settimeout(10)
    return client.buffer == b"" and extra == b""


def rewrite(path: Path, how: str) -> None:
    if how == "longer":
        path.write_bytes(SMALL + b"and four more lines\n" * 4)  # in place: same inode
    elif how == "shorter":
        path.write_bytes(b"abc")
    else:  # a new file of the same length under the same name
        other = path.with_name("replacement")
        other.write_bytes(SMALL.upper())
        os.rename(other, path)


@pytest.mark.parametrize("how", ["longer", "shorter", "replaced"])
def test_retr_of_a_message_rewritten_after_login_is_sys_temp(changing, how: str) -> None:
    server, root = changing
    client = Client(server)
    client.login(how)
    size = len(SMALL.replace(b"\n", b"\r\n"))
    client.send(b"LIST 1\r\n")
    assert client.line() == f"+OK 1 {size}\r\n".encode()
    rewrite(message_file(root, how), how)
    client.send(b"RETR 1\r\n")
    assert client.line() == b"-ERR [SYS/TEMP] Message is no longer available.\r\n"
    assert nothing_more(client)  # no status line, no body, no terminator
    client.send(b"NOOP\r\n")
    assert client.line() == b"+OK\r\n"  # the session goes on
    client.send(b"LIST 1\r\n")
    assert client.line() == f"+OK 1 {size}\r\n".encode()  # the promise of this session stands
    client.send(b"QUIT\r\n")
    assert client.line() == b"+OK Logging out.\r\n"
    client.close()
    again = Client(server)  # the next login measures the new file and serves it whole
    again.login(how)
    new = message_file(root, how).read_bytes()
    wire = new.replace(b"\n", b"\r\n") + (b"" if new.endswith(b"\n") else b"\r\n")
    again.send(b"RETR 1\r\n")
    assert again.line() == f"+OK {len(wire)} octets\r\n".encode()
    assert again.read(len(wire) + 3) == wire + b".\r\n"
    again.send(b"QUIT\r\n")
    assert again.line() == b"+OK Logging out.\r\n"
    again.close()
    rewrite_back = message_file(root, how)
    rewrite_back.write_bytes(SMALL)


@pytest.mark.parametrize("how", ["grows", "shrinks"])
def test_message_changed_while_streaming_cuts_the_connection(changing, how: str) -> None:
    server, root = changing
    path = message_file(root, how)
    client = Client(server)
    client.login(how)
    size = len(b"Subject: big\r\n\r\n") + (BIG_LINES // 1024) * 1024 * (len(BIG_LINE) + 1)
    client.send(b"RETR 1\r\n")
    assert client.line() == f"+OK {size} octets\r\n".encode()
    if how == "grows":
        with open(path, "ab") as handle:  # appended in place after the open
            handle.write(BIG_LINE * 100_000)
    else:
        os.truncate(path, 1 << 20)
    received = len(client.buffer)
    tail = client.buffer[-5:]
    client.sock.settimeout(30)
    while True:
        try:
            chunk = client.sock.recv(1 << 20)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += len(chunk)
        tail = (tail + chunk)[-5:]
    assert tail != b"\r\n.\r\n", "a body of another size was terminated as if complete"
    assert received < size  # dot-stuffing adds nothing here (no line starts with '.')
    client.close()
    for _ in range(50):
        log = server.log_path.read_text(encoding="utf-8", errors="replace")
        if "connection cut" in log and f"{size} octets promised" in log:
            break
        time.sleep(0.1)
    assert "connection cut" in log and f"{size} octets promised" in log, log[-2000:]
