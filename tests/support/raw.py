"""A raw POP3 client for protocol tests: exact bytes out, exact bytes in, and event helpers."""

from __future__ import annotations

import base64
import socket
import struct

from tests.support.pop3shield_server import Pop3ShieldServer

PASSWORD = "Corr3ct-Horse-Battery"


class Client:
    """A raw POP3 connection: exact bytes out, exact bytes in."""

    def __init__(self, server: Pop3ShieldServer) -> None:
        self.sock = socket.create_connection((server.host, server.port), timeout=10)
        self.buffer = b""
        self.greeting = self.line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError(f"closed; pending {self.buffer!r}")
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line + b"\r\n"

    def read(self, size: int) -> bytes:
        """Exactly ``size`` bytes."""
        while len(self.buffer) < size:
            if not self._fill():
                raise ConnectionError(f"closed after {self.buffer!r}")
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def closed(self, wait: float = 5.0) -> bool:
        """True if the server closes the connection (after anything still pending)."""
        self.sock.settimeout(wait)
        try:
            while self._fill():
                pass
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True
        return True

    def still_open(self) -> bool:
        """The session still answers: NOOP gets a reply (either state)."""
        self.send(b"NOOP\r\n")
        return self.line().startswith((b"+OK", b"-ERR"))

    def login(self, user: str = "alice", password: str = PASSWORD) -> None:
        self.send(f"USER {user}\r\nPASS {password}\r\n".encode())
        assert self.line() == b"+OK\r\n"
        assert self.line().startswith(b"+OK Logged in")

    def close(self) -> None:
        self.sock.close()


def new_events(server: Pop3ShieldServer, before: int) -> list[dict]:
    return [e for e in server.events()[before:] if e.get("type") == "security"]


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def client_hello() -> bytes:
    """A TLS 1.2 ClientHello record as a TLS client sends it first: binary, no line end."""
    body = b"\x03\x03" + bytes(range(32)) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00" + b"\x00\x00"
    handshake = b"\x01" + struct.pack(">I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack(">H", len(handshake)) + handshake
