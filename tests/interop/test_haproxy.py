"""Scale-out: a real HAProxy in front of two pop3shield instances sharing a real Redis.

HAProxy (send-proxy-v2, and a second one with send-proxy v1) connects to the instances from
127.0.0.9, the one address they trust for PROXY headers; clients connect to HAProxy from
127.0.0.2 / 127.0.0.3, so their address can only reach pop3shield through the header. Checked:
poplib and curl fetch through it, the client's address is in the events and the log of the
instance that served it, an untrusted peer's header is refused, a brute force spread over both
instances meets one shared penalty, and Redis going away gives fail-closed or fail-open.
Everything on loopback, started by the test and stopped by PID.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from pop3shield.maildir import Maildir
from tests.support.clients import fetch_with_curl, fetch_with_poplib
from tests.support.haproxy import HAProxy
from tests.support.pop3shield_server import Pop3ShieldServer
from tests.support.redis import RedisServer

USERS = {"alice": "s3cret-pass", "carol": "other-pass"}
PROXY_SOURCE = "127.0.0.9"
MESSAGES = [b"Subject: one\n\nfirst\n", b"Subject: two\n\n.dot line\nend\n"]
EXPECTED = [b"Subject: one\r\n\r\nfirst\r\n", b"Subject: two\r\n\r\n.dot line\r\nend\r\n"]


def server_toml(base_delay: float = 0.2) -> str:
    return (f'proxy_protocol_networks = ["{PROXY_SOURCE}/32"]\nproxy_protocol_timeout = 2\n'
            f"auth_failure_delay = {base_delay}\nauth_failure_delay_max = 15\n")


def state_toml(url: str, on_error: str) -> str:
    return f'[state]\nredis = "{url}"\non_error = "{on_error}"\ntimeout = 0.5\nconnection_ttl = 6\n'


def start_shield(tmp: Path, name: str, url: str, on_error: str, maildir_root: Path,
                 passwd: Path | None) -> Pop3ShieldServer:
    server = Pop3ShieldServer(server_toml=server_toml(), extra_toml=state_toml(url, on_error), passwd_file=passwd)
    server.start(tmp / name, USERS, maildir_root)
    return server


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("scale")
    maildir_root = tmp / "mail"
    store = Maildir(maildir_root / "alice" / "Maildir", create=True)
    for message in MESSAGES:
        store.deliver(message)
    redis = RedisServer()
    redis.start(tmp / "redis")
    shields: list[Pop3ShieldServer] = []
    proxies: list[HAProxy] = []
    try:
        shields.append(start_shield(tmp, "one", redis.url, "fail-closed", maildir_root, None))
        shields.append(start_shield(tmp, "two", redis.url, "fail-closed", maildir_root, shields[0].passwd_path))
        backends = [(s.host, s.port) for s in shields]
        for send_proxy in ("send-proxy-v2", "send-proxy"):
            proxy = HAProxy(backends, send_proxy=send_proxy, source=PROXY_SOURCE, check=True)
            proxy.start(tmp / send_proxy)
            proxies.append(proxy)
        yield {"redis": redis, "shields": shields, "v2": proxies[0], "v1": proxies[1], "tmp": tmp}
    finally:
        for proxy in proxies:
            proxy.stop()
        for shield in shields:
            shield.stop()
        redis.stop()


def log_lines(server: Pop3ShieldServer, needle: str) -> list[str]:
    assert server.log_path is not None
    text = server.log_path.read_text(errors="replace") if server.log_path.exists() else ""
    return [line for line in text.splitlines() if needle in line]


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def closing_lines(site, address: str) -> list[list[str]]:
    """Per instance, the session-closed log lines of sessions from ``address``."""
    return [log_lines(s, f"client={address}:") for s in site["shields"]]


def recv_until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything until the server closes (a reset, from an abort, counts as closing)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("proxy", ["v2", "v1"])
def test_poplib_through_haproxy(site, proxy: str) -> None:
    front = site[proxy]
    source = "127.0.0.2"
    before = [len(lines) for lines in closing_lines(site, source)]
    assert fetch_with_poplib(front.host, front.port, "alice", USERS["alice"], source=source) == EXPECTED
    after = wait_for(lambda: [len(x) for x in closing_lines(site, source)] if
                     sum(len(x) for x in closing_lines(site, source)) > sum(before) else None,
                     what="the session's closing line with the client's address")
    assert sum(after) == sum(before) + 1
    served = [i for i in range(2) if after[i] > before[i]][0]
    assert "user=alice" in closing_lines(site, source)[served][-1]
    # the proxy's own address is never taken for a client that logged in
    assert not any("user=alice" in line for s in site["shields"] for line in log_lines(s, f"client={PROXY_SOURCE}:"))


def test_health_checks_with_a_header_are_not_refused(site) -> None:
    """HAProxy's check-send-proxy: v2 sends a LOCAL header, v1 "PROXY UNKNOWN"; both are served."""
    shields = site["shields"]
    checks = [len(log_lines(s, f"client={PROXY_SOURCE}:")) for s in shields]
    refusals = [len(log_lines(s, "refused: PROXY header")) for s in shields]
    time.sleep(3)  # two proxies, a check a second each: several checks reach each instance
    assert all(len(log_lines(s, f"client={PROXY_SOURCE}:")) >= n + 4 for s, n in zip(shields, checks))
    assert [len(log_lines(s, "refused: PROXY header")) for s in shields] == refusals


def test_shipped_haproxy_config_is_valid() -> None:
    from tests.support import REPO_ROOT, require_binary

    haproxy = require_binary("haproxy")
    run = subprocess.run([haproxy, "-c", "-f", str(REPO_ROOT / "etc" / "haproxy" / "pop3shield.cfg")],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("proxy", ["v2", "v1"])
def test_curl_through_haproxy(site, proxy: str, tmp_path: Path) -> None:
    front = site[proxy]
    assert fetch_with_curl(front.host, front.port, "alice", USERS["alice"], home=tmp_path,
                           source="127.0.0.2") == EXPECTED
    assert wait_for(lambda: any("user=alice" in line for lines in closing_lines(site, "127.0.0.2")
                                for line in lines))


def test_events_name_the_client_on_the_instance_that_served_it(site) -> None:
    front = site["v2"]
    with socket.create_connection((front.host, front.port), timeout=5, source_address=("127.0.0.2", 0)) as sock:
        sock.settimeout(5)
        assert read_line(sock).startswith(b"+OK ")
        sock.sendall(b"USER \r\n")  # an empty user name: an empty_username event
        reply = read_line(sock)
        assert reply.startswith(b"-ERR")
        local_port = sock.getsockname()[1]

    def found():
        per_instance = [[e for e in s.events() if e.get("protection") == "empty_username"
                         and e.get("client", {}).get("port") == local_port] for s in site["shields"]]
        return per_instance if any(per_instance) else None
    per_instance = wait_for(found, what="the empty_username event")
    assert sorted(len(x) for x in per_instance) == [0, 1]  # one instance served it, and only it logged it
    event = [e for x in per_instance for e in x][0]
    assert event["client"] == {"address": "127.0.0.2", "port": local_port}


def v1_header(source: str, port: int) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.1 {port} 110\r\n".encode()


def test_untrusted_peer_sending_a_header_is_refused(site) -> None:
    shield = site["shields"][0]
    with socket.create_connection((shield.host, shield.port), timeout=5, source_address=("127.0.0.5", 0)) as sock:
        sock.settimeout(5)
        assert read_line(sock).startswith(b"+OK ")  # an ordinary client, greeted at once
        sock.sendall(v1_header("198.51.100.1", 1234) + b"USER alice\r\n")
        assert recv_until_closed(sock) == b""  # no reply to the header or to what followed
    wait_for(lambda: log_lines(shield, "refused: PROXY header from untrusted 127.0.0.5:"), what="the refusal line")


def test_trusted_peer_without_a_valid_header_is_closed_without_a_byte(site) -> None:
    shield = site["shields"][1]
    with socket.create_connection((shield.host, shield.port), timeout=5,
                                  source_address=(PROXY_SOURCE, 0)) as sock:
        sock.sendall(b"CAPA\r\n")
        assert recv_until_closed(sock) == b""
    with socket.create_connection((shield.host, shield.port), timeout=5,
                                  source_address=(PROXY_SOURCE, 0)) as sock:
        started = time.monotonic()
        assert recv_until_closed(sock, timeout=10) == b""  # nothing at all: the 2 s header timeout
        assert 1.5 < time.monotonic() - started < 8
    wait_for(lambda: log_lines(shield, f"refused: PROXY header from {PROXY_SOURCE}:") and
             log_lines(shield, "no header in time"), what="both refusal lines")


def failed_login_seconds(front: HAProxy, source: str, user: str) -> float:
    with socket.create_connection((front.host, front.port), timeout=30, source_address=(source, 0)) as sock:
        sock.settimeout(30)
        assert read_line(sock).startswith(b"+OK ")
        sock.sendall(f"USER {user}\r\n".encode())
        assert read_line(sock).startswith(b"+OK")
        started = time.monotonic()
        sock.sendall(b"PASS wrong-guess\r\n")
        reply = read_line(sock)
        elapsed = time.monotonic() - started
        assert reply.startswith(b"-ERR [AUTH]"), reply
        sock.sendall(b"QUIT\r\n")
        return elapsed


def test_brute_force_spread_over_both_instances_meets_one_penalty(site) -> None:
    source = "127.0.0.3"
    times = [failed_login_seconds(site["v2"], source, "carol") for _ in range(5)]
    # 0.2 x 2^(n-1): 0.2, 0.4, 0.8, 1.6, 3.2 s. Alone, each instance would have seen 3 and 2
    # failures, so none would have waited more than 0.8 s.
    assert times[4] > 2.9 and times[3] > 1.4, times
    assert all(later > earlier for earlier, later in zip(times, times[1:])), times
    def served():
        counts = [sum("logins_failed=1" in line for line in lines) for lines in closing_lines(site, source)]
        return counts if sum(counts) == 5 else None
    assert sorted(wait_for(served, what="five closing lines")) == [2, 3]  # round robin: both instances took part
    # a valid login by carol from there forgives her pair's failures only
    front = site["v2"]
    assert fetch_with_poplib(front.host, front.port, "carol", USERS["carol"], source=source) == []
    assert failed_login_seconds(site["v2"], source, "carol") < 0.6


# --------------------------------------------------------------------------- Redis going away


def test_redis_going_away_fail_closed_and_fail_open(tmp_path: Path) -> None:
    maildir_root = tmp_path / "mail"
    store = Maildir(maildir_root / "alice" / "Maildir", create=True)
    store.deliver(MESSAGES[0])
    redis = RedisServer()
    redis.start(tmp_path / "redis")
    closed = opened = None
    try:
        closed = start_shield(tmp_path, "closed", redis.url, "fail-closed", maildir_root, None)
        opened = start_shield(tmp_path, "open", redis.url, "fail-open", maildir_root, closed.passwd_path)
        assert fetch_with_poplib(closed.host, closed.port, "alice", USERS["alice"]) == EXPECTED[:1]
        pending = socket.create_connection((closed.host, closed.port), timeout=5)
        assert read_line(pending).startswith(b"+OK ")
        pending.sendall(b"USER alice\r\n")
        assert read_line(pending) == b"+OK\r\n"
        redis.stop()
        # fail-closed: a login under way is answered -ERR [SYS/TEMP], its password unchecked
        pending.sendall(f"PASS {USERS['alice']}\r\n".encode())
        assert read_line(pending) == b"-ERR [SYS/TEMP] Temporary server problem, try again later.\r\n"
        pending.close()
        # fail-closed: a new connection is answered -ERR [SYS/TEMP] and closed
        with socket.create_connection((closed.host, closed.port), timeout=5) as sock:
            assert recv_until_closed(sock) == b"-ERR [SYS/TEMP] Temporary server problem, try again later.\r\n"
        wait_for(lambda: log_lines(closed, "refused: shared state unavailable"), what="fail-closed log line")
        # fail-open: served from this process's own state, and it says so once
        assert fetch_with_poplib(opened.host, opened.port, "alice", USERS["alice"]) == EXPECTED[:1]
        assert fetch_with_poplib(opened.host, opened.port, "alice", USERS["alice"]) == EXPECTED[:1]
        assert len(wait_for(lambda: log_lines(opened, "fail-open, using this process's own state"))) == 1
        # Redis back: fail-open ends with a line, fail-closed serves again
        redis.start()
        wait_for(lambda: log_lines(opened, "fail-open ended"), what="the fail-open end line")
        assert fetch_with_poplib(closed.host, closed.port, "alice", USERS["alice"]) == EXPECTED[:1]
        # a Redis that hangs instead of going away: every command gives up after state.timeout
        assert redis.proc is not None
        os.kill(redis.proc.pid, signal.SIGSTOP)
        try:
            # 16 at once on 2 threads: without the queue deadline the last would wait 16 x 0.5 / 2 = 4 s
            started = time.monotonic()
            socks = [socket.create_connection((closed.host, closed.port), timeout=10) for _ in range(16)]
            try:
                for sock in socks:
                    assert recv_until_closed(sock, timeout=10) == (
                        b"-ERR [SYS/TEMP] Temporary server problem, try again later.\r\n")
            finally:
                for sock in socks:
                    sock.close()
            assert time.monotonic() - started < 2.5
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        password_lines = [line for s in (closed, opened) for line in log_lines(s, USERS["alice"])]
        assert password_lines == []
    finally:
        for server in (closed, opened):
            if server is not None:
                server.stop()
        redis.stop()


def test_connections_of_a_dead_process_expire(tmp_path: Path) -> None:
    """Per-address counts live in Redis with a TTL that only a live process renews."""
    maildir_root = tmp_path / "mail"
    Maildir(maildir_root / "alice" / "Maildir", create=True)
    redis = RedisServer()
    redis.start(tmp_path / "redis")
    first = second = None
    try:
        limit = "max_connections_per_ip = 1\n"
        first = Pop3ShieldServer(server_toml=limit, extra_toml=state_toml(redis.url, "fail-closed"))
        first.start(tmp_path / "first", USERS, maildir_root)
        second = Pop3ShieldServer(server_toml=limit, extra_toml=state_toml(redis.url, "fail-closed"),
                                  passwd_file=first.passwd_path)
        second.start(tmp_path / "second", USERS, maildir_root)
        held = socket.create_connection((first.host, first.port), timeout=5, source_address=("127.0.0.4", 0))
        assert read_line(held).startswith(b"+OK ")
        # the other instance sees that connection: 127.0.0.4 is at its limit of one
        with socket.create_connection((second.host, second.port), timeout=5,
                                      source_address=("127.0.0.4", 0)) as sock:
            assert recv_until_closed(sock) == b"-ERR [SYS/TEMP] Too many connections from your address.\r\n"
        time.sleep(7)  # longer than connection_ttl: the live process renewed its member
        with socket.create_connection((second.host, second.port), timeout=5,
                                      source_address=("127.0.0.4", 0)) as sock:
            assert recv_until_closed(sock) == b"-ERR [SYS/TEMP] Too many connections from your address.\r\n"
        # the first process dies without releasing anything
        assert first.proc is not None
        first.proc.kill()
        first.proc.wait(timeout=5)
        held.close()
        time.sleep(6.5)

        def admitted() -> bool:
            with socket.create_connection((second.host, second.port), timeout=5,
                                          source_address=("127.0.0.4", 0)) as sock:
                return read_line(sock).startswith(b"+OK ")
        assert wait_for(admitted, timeout=5, what="the dead process's connection to expire")
    finally:
        for server in (first, second):
            if server is not None:
                server.stop()
        redis.stop()
