"""A private HAProxy for tests: its own config in a temp dir, loopback only, stopped by PID.

``HAProxy(backends, send_proxy="send-proxy-v2").start(tmpdir)`` writes ``<tmp>/haproxy.cfg``:
one TCP frontend on ``127.0.0.1:<free port>``, round-robin over ``backends`` (``(host, port)``)
with ``send-proxy-v2`` (or ``send-proxy`` for v1; ``check=True`` adds health checks that
carry a header too), connecting *from* ``source`` (default
127.0.0.9) so the backends can trust exactly that address; runs ``haproxy -db -f CFG`` in the
foreground in a session of its own, waits until the frontend accepts, returns ``(host, port)``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path

from . import ChildServer, require_binary
from .dovecot import free_port

__all__ = ["HAProxy"]

CONFIG = """\
global
    maxconn 200
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend pop3
    bind {host}:{port}
    default_backend shields
backend shields
    balance roundrobin
    source {source}
{servers}
"""


class HAProxy(ChildServer):
    def __init__(self, backends: list[tuple[str, int]], *, send_proxy: str = "send-proxy-v2",
                 host: str = "127.0.0.1", source: str = "127.0.0.9", check: bool = False) -> None:
        assert send_proxy in ("send-proxy", "send-proxy-v2")
        self.backends = backends
        self.send_proxy = send_proxy
        self.host = host
        self.source = source
        #: TCP health checks every second that carry a header too (``check-send-proxy``)
        self.check = check
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.workdir: Path | None = None

    def start(self, tmpdir: os.PathLike | str, timeout: float = 10.0) -> tuple[str, int]:
        binary = require_binary("haproxy")
        self.workdir = Path(tmpdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port(self.host)
        checks = " check check-send-proxy inter 1s" if self.check else ""
        servers = "\n".join(f"    server s{i} {h}:{p} {self.send_proxy}{checks}" for i, (h, p) in enumerate(self.backends))
        cfg = self.workdir / "haproxy.cfg"
        cfg.write_text(CONFIG.format(host=self.host, port=self.port, source=self.source, servers=servers))
        self.log = self.workdir / "haproxy.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([binary, "-db", "-f", str(cfg)], stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True, cwd=str(self.workdir))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited: {self.log.read_text(errors='replace')}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=1):
                return self.host, self.port
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("haproxy did not accept connections")
