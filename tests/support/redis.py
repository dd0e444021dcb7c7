"""A private, throw-away Redis for tests: own config and data directory under a temp dir.

``RedisServer().start(tmpdir)`` writes ``<tmp>/redis.conf`` (loopback only, a free port chosen
here because Redis does not take ``port 0``, no persistence, ``dir`` and ``logfile`` in the temp
dir), runs ``redis-server <conf>`` in a session of its own, waits until it answers ``PING``,
and returns ``(host, port)``. ``stop()`` sends SIGTERM to that PID, then SIGKILLs it.
``start()`` again after ``stop()`` reuses the same port and directory (Redis coming back).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from . import ChildServer, require_binary
from .dovecot import free_port, tail

__all__ = ["RedisServer"]

CONFIG = """\
bind {host}
port {port}
protected-mode yes
daemonize no
supervised no
dir {dir}
logfile {log}
save ""
appendonly no
databases 2
"""


class RedisServer(ChildServer):
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port: int | None = None
        self.workdir: Path | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, tmpdir: os.PathLike | str | None = None, timeout: float = 10.0) -> tuple[str, int]:
        binary = require_binary("redis-server")
        if self.workdir is None:
            assert tmpdir is not None
            self.workdir = Path(tmpdir).resolve()
            (self.workdir / "data").mkdir(parents=True, exist_ok=True)
            self.port = free_port(self.host)
            conf = CONFIG.format(host=self.host, port=self.port, dir=self.workdir / "data",
                                 log=self.workdir / "redis.log")
            (self.workdir / "redis.conf").write_text(conf)
        self.proc = subprocess.Popen([binary, str(self.workdir / "redis.conf")], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, cwd=str(self.workdir))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {tail(self.workdir / 'redis.log')}")
            if self.command(b"PING") == b"+PONG":
                return self.host, self.port
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING: {tail(self.workdir / 'redis.log')}")

    def command(self, *words: bytes) -> bytes | None:
        """One RESP command over a fresh socket; the first reply line, or None if unreachable."""
        request = b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)
        try:
            with socket.create_connection((self.host, self.port), timeout=2) as s:
                s.sendall(request)
                data = b""
                while not data.endswith(b"\r\n"):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                return data.split(b"\r\n", 1)[0]
        except OSError:
            return None
