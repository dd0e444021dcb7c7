"""A 200 MB message through a real server: exact bytes, bounded memory, a slow reader stalls nothing."""

from __future__ import annotations

import hashlib
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
