"""Issue 10, "Fair, bounded analysis", over real sockets with the real detector.

One address floods the detector's slow tier with long random-letter USER lines from 40
connections; meanwhile ten honest users log in from another network of 127.0.0.0/8 with
48-character passwords (which tier 0 cannot judge either). Every honest login must succeed,
and no malicious_code event may name an honest user; the flood itself is refused for capacity.
"""

from __future__ import annotations

import random
import socket
import string
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


from tests.support.clients import fetch_with_poplib
from tests.support.pop3shield_server import Pop3ShieldServer

FLOOD_SOURCE = "127.0.0.1"
HONEST_SOURCE = "127.0.1.2"  # another /24: another source for the slow tier
FLOOD_CONNECTIONS = 40
FLOOD_SECONDS_MAX = 60.0


def _password(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits + "!#%&*+-=?") for _ in range(48))


def _flood(host: str, port: int, stop: threading.Event, seed: int, stats: dict[str, int]) -> None:
    rng = random.Random(seed)
    deadline = time.monotonic() + FLOOD_SECONDS_MAX
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=10, source_address=(FLOOD_SOURCE, 0)) as sock:
                reader = sock.makefile("rb")
                if not reader.readline().startswith(b"+OK"):
                    continue
                while not stop.is_set():
                    name = "".join(rng.choice(string.ascii_letters) for _ in range(200)).encode()
                    sock.sendall(b"USER " + name + b"\r\n")
                    answer = reader.readline()
                    if not answer:
                        break
                    key = "busy" if answer.startswith(b"-ERR [SYS/TEMP]") else answer[:3].decode("ascii", "replace")
                    stats[key] = stats.get(key, 0) + 1
        except OSError:
            time.sleep(0.01)


def test_one_source_flooding_the_detector_does_not_starve_honest_long_passwords(tmp_path: Path) -> None:
    rng = random.Random(1939)
    honest = {f"user{i}": _password(rng) for i in range(10)}
    server = Pop3ShieldServer(server_toml="max_connections_per_ip = 200\nauth_failure_delay = 0")
    host, port = server.start(tmp_path / "srv", honest, tmp_path / "mail")
    stop = threading.Event()
    stats: dict[str, int] = {}
    flooders = [threading.Thread(target=_flood, args=(host, port, stop, i, stats), daemon=True)
                for i in range(FLOOD_CONNECTIONS)]
    try:
        for thread in flooders:
            thread.start()
        deadline = time.monotonic() + 30
        while stats.get("busy", 0) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)  # the tier is saturated: the flood's own requests are refused
        assert stats.get("busy", 0) >= 20, (stats, server.diagnostics())
        with ThreadPoolExecutor(max_workers=10) as pool:
            results = list(pool.map(
                lambda item: _login(host, port, *item), honest.items()))
        assert results == [("ok", [])] * 10, (results, stats, server.diagnostics())
    finally:
        stop.set()
        for thread in flooders:
            thread.join(15)
        events = server.events()
        server.stop()
    mcp = [e for e in events if e.get("protection") == "malicious_code"]
    assert not [e for e in mcp if e.get("user") in honest], mcp[:3]
    log = server.log_path.read_text(encoding="utf-8")
    assert "malicious-code analysis at capacity" in log


def _login(host: str, port: int, user: str, password: str) -> tuple[str, list[bytes]]:
    try:
        return "ok", fetch_with_poplib(host, port, user, password, source=HONEST_SOURCE, timeout=30)
    except Exception as exc:  # noqa: BLE001 - the assertion shows which login failed and why
        return f"{type(exc).__name__}: {exc}", []
