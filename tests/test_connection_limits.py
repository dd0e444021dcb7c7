"""Issue 10, "Connection limits": per address before login (with per-network overrides) and a
per-address rate of new connections, each answered with one -ERR line, closed, and counted.

A real server, real sockets bound to addresses of 127.0.0.0/8, the counter read from the
Prometheus endpoint. The counts go through the shared-state interface (LocalState here; the
Redis implementation runs the same token bucket in test_state_redis.py).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from pop3shield.config import ConfigError, parse_config
from pop3shield.limits import AddressLimits, ConnectionPolicy
from pop3shield.state import LocalState
from tests.support.pop3shield_server import Pop3ShieldServer
from tests.test_metrics import _metrics_address, samples, scrape, value

TOO_FAST = b"-ERR [SYS/TEMP] Too many new connections from your address, try again later.\r\n"
TOO_MANY = b"-ERR [SYS/TEMP] Too many connections from your address.\r\n"


def _open(host: str, port: int, source: str) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection((host, port), timeout=10, source_address=(source, 0))
    return sock, sock.makefile("rb").readline()


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except OSError:
        return True


def test_rate_and_per_network_limits_over_real_sockets(tmp_path: Path) -> None:
    server = Pop3ShieldServer(
        server_toml="new_connections_per_ip = 0.5\nnew_connections_burst = 3\nmax_connections_per_ip = 50\n"
                    'connection_limits = [{ networks = ["127.0.2.0/24"], max_connections_per_ip = 1 },\n'
                    '  { networks = ["127.0.3.0/24"], new_connections_per_ip = 1000.0, new_connections_burst = 1000 }]',
        extra_toml='[metrics]\nlisten = "tcp:0:interface=127.0.0.1"\n')
    host, port = server.start(tmp_path / "srv", {"alice": "alice-secret"}, tmp_path / "mail")
    held: list[socket.socket] = []
    try:
        mhost, mport, _ = _metrics_address(server)
        # a burst of 3 from one address, then the 4th too soon: refused and closed
        for _ in range(3):
            sock, greeting = _open(host, port, "127.0.1.1")
            held.append(sock)
            assert greeting.startswith(b"+OK"), greeting
        sock, answer = _open(host, port, "127.0.1.1")
        assert answer == TOO_FAST and _closed(sock)
        sock.close()
        time.sleep(2.5)  # one every 2 s: a token is back
        sock, greeting = _open(host, port, "127.0.1.1")
        held.append(sock)
        assert greeting.startswith(b"+OK")
        # another address has its own bucket
        sock, greeting = _open(host, port, "127.0.1.2")
        held.append(sock)
        assert greeting.startswith(b"+OK")
        # an override: one connection at a time for 127.0.2.0/24, the next refused and closed
        sock, greeting = _open(host, port, "127.0.2.5")
        held.append(sock)
        assert greeting.startswith(b"+OK")
        sock, answer = _open(host, port, "127.0.2.5")
        assert answer == TOO_MANY and _closed(sock)
        sock.close()
        # an override raising the rate: a NAT's burst of 20 is served
        for _ in range(20):
            sock, greeting = _open(host, port, "127.0.3.9")
            held.append(sock)
            assert greeting.startswith(b"+OK"), greeting
        parsed = samples(scrape(mhost, mport))
        assert value(parsed, "pop3shield_connections_refused_total", reason="rate") == 1
        assert value(parsed, "pop3shield_connections_refused_total", reason="address") == 1
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_the_token_bucket_refills_at_its_rate_and_is_bounded() -> None:
    clock = Clock()
    state = LocalState(clock.seconds, max_entries=2)
    assert [state.take_now("addr:a", 1.0, 2) for _ in range(3)] == [True, True, False]
    clock.advance(0.5)
    assert not state.take_now("addr:a", 1.0, 2)
    clock.advance(0.5)
    assert state.take_now("addr:a", 1.0, 2)
    clock.advance(100)
    assert [state.take_now("addr:a", 1.0, 2) for _ in range(3)] == [True, True, False]  # never above the burst
    for name in ("b", "c", "d"):
        state.take_now(f"addr:{name}", 1.0, 2)
    assert len(state._buckets) == 2  # least recently used evicted (a full bucket: it only forgives)


def test_the_policy_matches_the_first_network_and_ipv4_mapped_addresses() -> None:
    import ipaddress

    default = AddressLimits(300, 30.0, 300)
    nat = AddressLimits(2000, 100.0, 2000)
    policy = ConnectionPolicy(default, [((ipaddress.ip_network("10.0.0.0/8"),), nat)])
    assert policy.for_address("10.1.2.3") is nat
    assert policy.for_address("::ffff:10.1.2.3") is nat
    assert policy.for_address("192.0.2.1") is default
    assert policy.for_address(None) is default


AUTH = {"auth": {"realm": "a:b"}}


def test_connection_limit_config() -> None:
    server = parse_config({"server": {"connection_limits": [
        {"networks": ["10.0.0.0/8"], "max_connections_per_ip": 2000}]}, **AUTH}, "p.toml", ".").server
    assert server.max_connections_per_ip == 300 and server.new_connections_per_ip == 30.0
    [override] = server.connection_limits
    assert override.max_connections_per_ip == 2000 and override.new_connections_per_ip is None


@pytest.mark.parametrize("limits, message", [
    ([{"networks": ["10.0.0.1/8"], "max_connections_per_ip": 5}],
     "p.toml: server.connection_limits[0].networks[0]: '10.0.0.1/8' has host bits set"),
    ([{"networks": ["10.0.0.0/8"]}], "p.toml: server.connection_limits[0].networks: the entry sets no limit"),
    ([{"networks": ["10.0.0.0/8"], "max": 5}], "p.toml: server.connection_limits[0].max: unknown key"),
    ([{"networks": [], "max_connections_per_ip": 5}], "p.toml: server.connection_limits[0].networks: must list"),
])
def test_connection_limit_config_errors(limits: list, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"server": {"connection_limits": limits}, **AUTH}, "p.toml", ".")
    assert str(info.value).startswith(message)


def test_a_small_max_connections_lowers_the_unset_per_address_default() -> None:
    server = parse_config({"server": {"max_connections": 100}, **AUTH}, "p.toml", ".").server
    assert server.max_connections_per_ip == 100
    with pytest.raises(ConfigError) as info:
        parse_config({"server": {"max_connections": 100, "max_connections_per_ip": 200}, **AUTH}, "p.toml", ".")
    assert str(info.value) == ("p.toml: server.max_connections_per_ip: must not exceed server.max_connections "
                               "(100), got 200")


EVICTED = b"-ERR [SYS/TEMP] Server full, disconnecting the oldest clients not logged in.\r\n"
SERVER_FULL = b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"


def _command(sock: socket.socket, line: bytes) -> bytes:
    sock.sendall(line + b"\r\n")
    reply = b""
    while not reply.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        assert chunk, reply
        reply += chunk
    return reply


def _greeted(host: str, port: int, source: str) -> tuple[socket.socket, bytes]:
    """A connection and its first line, read without buffering past it."""
    sock = socket.create_connection((host, port), timeout=10, source_address=(source, 0))
    line = b""
    while not line.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        line += chunk
    return sock, line


def test_a_full_server_evicts_the_oldest_waiting_connection_of_the_busiest_address(tmp_path: Path) -> None:
    """Slowloris: half-open connections fill max_connections; a new client pushes the oldest of the
    address holding the most out (Dovecot's login processes do the same), never a logged-in session."""
    server = Pop3ShieldServer(server_toml="max_connections = 6\nmax_connections_per_ip = 6",
                              extra_toml='[metrics]\nlisten = "tcp:0:interface=127.0.0.1"\n')
    host, port = server.start(tmp_path / "srv", {"alice": "alice-secret", "bob": "bob-secret"}, tmp_path / "mail")
    held: list[socket.socket] = []
    try:
        mhost, mport, _ = _metrics_address(server)
        # one client of 127.0.5.1 waits at the greeting, then four half-open ones of 127.0.6.1 fill it
        lone, greeting = _greeted(host, port, "127.0.5.1")
        assert greeting.startswith(b"+OK")
        time.sleep(0.05)
        attackers = []
        for _ in range(4):
            sock, greeting = _greeted(host, port, "127.0.6.1")
            assert greeting.startswith(b"+OK"), greeting
            attackers.append(sock)
            time.sleep(0.05)
        # a logged-in session is never evicted
        alice, greeting = _greeted(host, port, "127.0.7.1")
        assert greeting.startswith(b"+OK")
        assert _command(alice, b"USER alice").startswith(b"+OK")
        assert _command(alice, b"PASS alice-secret").startswith(b"+OK")
        # full: the next client gets in, and the oldest of 127.0.6.1 (not the older lone one) is told and closed
        bob, greeting = _greeted(host, port, "127.0.8.1")
        assert greeting.startswith(b"+OK"), greeting
        attackers[0].settimeout(10)
        assert attackers[0].makefile("rb").read() == EVICTED
        assert _command(bob, b"USER bob").startswith(b"+OK")
        assert _command(bob, b"PASS bob-secret").startswith(b"+OK")
        # the lone client and the logged-in session still work
        capabilities = _command(lone, b"CAPA")
        while not capabilities.endswith(b"\r\n.\r\n"):
            capabilities += lone.recv(4096)
        assert capabilities.startswith(b"+OK")
        assert _command(alice, b"STAT").startswith(b"+OK")
        # each new client (each from an address of its own) evicts the oldest waiting connection of the
        # address with the most: two more of 127.0.6.1, then, all at one each, the oldest: lone, then the last
        for index, victim in enumerate([attackers[1], attackers[2], lone, attackers[3]]):
            sock, greeting = _greeted(host, port, f"127.0.9.{index + 1}")
            assert greeting.startswith(b"+OK"), greeting
            held.append(sock)
            victim.settimeout(10)
            assert victim.makefile("rb").read() == EVICTED
        parsed = samples(scrape(mhost, mport))
        assert value(parsed, "pop3shield_connections_evicted_total") == 5
        for sock in held:
            sock.close()
        held.clear()
        time.sleep(0.5)
        users = []
        for _ in range(4):  # alice and bob hold two places; four more logged-in sessions fill the server
            sock, greeting = _greeted(host, port, "127.0.10.1")
            assert greeting.startswith(b"+OK"), greeting
            users.append(sock)
        # the four are waiting to log in: a seventh evicts the oldest of them, not alice or bob
        sock, greeting = _greeted(host, port, "127.0.11.1")
        assert greeting.startswith(b"+OK")
        users[0].settimeout(10)
        assert users[0].makefile("rb").read() == EVICTED
        held.extend([sock, *users[1:]])
        assert _command(alice, b"NOOP").startswith(b"+OK") and _command(bob, b"NOOP").startswith(b"+OK")
        for sock in (alice, bob, lone, *attackers):
            sock.close()
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_a_server_full_of_logged_in_sessions_refuses(tmp_path: Path) -> None:
    server = Pop3ShieldServer(server_toml="max_connections = 2\nmax_connections_per_ip = 2")
    host, port = server.start(tmp_path / "srv", {"alice": "alice-secret", "bob": "bob-secret"}, tmp_path / "mail")
    sessions = []
    try:
        for user in ("alice", "bob"):
            sock, greeting = _greeted(host, port, "127.0.12.1")
            assert greeting.startswith(b"+OK")
            assert _command(sock, f"USER {user}".encode()).startswith(b"+OK")
            assert _command(sock, f"PASS {user}-secret".encode()).startswith(b"+OK")
            sessions.append(sock)
        sock, answer = _greeted(host, port, "127.0.12.2")
        assert answer == SERVER_FULL and _closed(sock)
        sock.close()
        assert _command(sessions[0], b"STAT").startswith(b"+OK")
    finally:
        for sock in sessions:
            sock.close()
        server.stop()
