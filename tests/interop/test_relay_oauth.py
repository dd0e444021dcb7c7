"""XOAUTH2 / OAUTHBEARER through a real pop3shield to a recording upstream that checks the bytes.

(A real Dovecot would need an OAuth2 introspection server; the recording upstream checks what
matters here: the token line reaches the upstream exactly as the client sent it.)
"""

from __future__ import annotations

import base64
import contextlib
import random
import socket
import string
import threading

import pytest

from tests.support.pop3shield_server import Pop3ShieldServer

MESSAGE = b"Subject: oauth\r\n\r\nrelayed\r\n"


class RecordingUpstream:
    """A tiny POP3 server offering XOAUTH2/OAUTHBEARER; records every line; accepts ``token``."""

    def __init__(self, accept: bytes) -> None:
        self.accept = accept
        self.lines: list[bytes] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            f = conn.makefile("rb")
            conn.sendall(b"+OK ready\r\n")
            sasl = False
            while line := f.readline():
                line = line.rstrip(b"\r\n")
                self.lines.append(line)
                word = line.split(b" ")[0].upper()
                if sasl:
                    sasl = False
                    conn.sendall(b"+OK logged in\r\n" if line == self.accept else b"-ERR [AUTH] no\r\n")
                elif word == b"CAPA":
                    conn.sendall(b"+OK\r\nUSER\r\nSASL PLAIN XOAUTH2 OAUTHBEARER\r\nUIDL\r\n.\r\n")
                elif word == b"AUTH":
                    sasl = True
                    conn.sendall(b"+ \r\n")
                elif word == b"STAT":
                    conn.sendall(b"+OK 1 %d\r\n" % len(MESSAGE))
                elif word == b"LIST":
                    conn.sendall(b"+OK\r\n1 %d\r\n.\r\n" % len(MESSAGE))
                elif word == b"UIDL":
                    conn.sendall(b"+OK\r\n1 oauth-1\r\n.\r\n")
                elif word == b"RETR":
                    conn.sendall(b"+OK\r\n" + MESSAGE + b".\r\n")
                elif word == b"QUIT":
                    conn.sendall(b"+OK bye\r\n")
                    return
                else:
                    conn.sendall(b"-ERR\r\n")

    def close(self) -> None:
        self.sock.close()


def _token(size: int) -> bytes:
    rng = random.Random(size)
    return ("ya29." + "".join(rng.choice(string.ascii_letters + string.digits + "-_")
                              for _ in range(size))).encode()


@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER"])
def test_oauth_token_reaches_the_upstream_unchanged(tmp_path, mechanism) -> None:
    tok = _token(2800)
    if mechanism == "XOAUTH2":
        message = b"user=alice@example.com\x01auth=Bearer " + tok + b"\x01\x01"
    else:
        message = b"n,a=alice@example.com,\x01auth=Bearer " + tok + b"\x01\x01"
    blob = base64.b64encode(message)
    upstream = RecordingUpstream(blob)
    server = Pop3ShieldServer(
        backend_toml=f'[backend]\ntype = "upstream"\nendpoint = "tcp:host=127.0.0.1:port={upstream.port}"\n'
                     "oauth = true\n", local_passwd=False)
    try:
        host, port = server.start(tmp_path / "ps", {}, tmp_path / "unused")
        with socket.create_connection((host, port), timeout=30) as s:
            f = s.makefile("rb")
            assert f.readline().startswith(b"+OK")
            s.sendall(b"CAPA\r\n")
            capa = b""
            while not capa.endswith(b"\r\n.\r\n"):
                capa += f.readline()
            assert b"SASL PLAIN LOGIN XOAUTH2 OAUTHBEARER\r\n" in capa
            s.sendall(b"AUTH " + mechanism.encode() + b"\r\n")
            assert f.readline() == b"+ \r\n"
            s.sendall(blob + b"\r\n")
            reply = f.readline()
            assert reply.startswith(b"+OK"), reply
            s.sendall(b"RETR 1\r\nQUIT\r\n")
            assert f.readline() == b"+OK %d octets\r\n" % len(MESSAGE)
            body = b""
            while not body.endswith(b"\r\n.\r\n"):
                body += f.readline()
            assert body == MESSAGE + b".\r\n"
            assert f.readline().startswith(b"+OK")
        auth = upstream.lines.index(b"AUTH " + mechanism.encode())
        assert upstream.lines[auth + 1] == blob  # byte for byte what the client sent
        assert [e for e in server.events() if e.get("type") == "security"] == []
        log = server.log_path.read_text(errors="replace")
        assert tok.decode() not in log and blob.decode() not in log
    finally:
        server.stop()
        upstream.close()
