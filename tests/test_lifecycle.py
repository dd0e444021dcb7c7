"""The life cycle on a real server process: SIGTERM's grace period (nothing deleted without QUIT)
and SIGHUP's reload (passwd file, STLS certificate, the config compared with the running one)."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import ssl
import time
from pathlib import Path

import trustme

from tests.support.messages import MESSAGES, write_maildir
from tests.support.pop3shield_server import Pop3ShieldServer, write_bcrypt_passwd
from tests.support.raw import PASSWORD, Client

SHUTTING_DOWN = b"-ERR [SYS/TEMP] Server shutting down.\r\n"


def _wait_for(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _messages(maildir: Path) -> int:
    return sum(1 for sub in ("cur", "new") for p in (maildir / sub).iterdir() if p.is_file())


def _login(server: Pop3ShieldServer, user: str) -> Client:
    client = Client(server)
    client.send(f"USER {user}\r\nPASS {PASSWORD}\r\n".encode())
    assert client.line() == b"+OK\r\n"
    assert client.line().startswith(b"+OK Logged in, 3 messages")
    return client


def _refused(server: Pop3ShieldServer) -> bool:
    try:
        with socket.create_connection((server.host, server.port), timeout=2) as sock:
            sock.settimeout(2)
            return sock.recv(100) == b""
    except OSError:
        return True


def test_sigterm_lets_sessions_finish_then_closes_the_rest_without_update(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    for user in ("alice", "bob"):
        write_maildir(root / user / "Maildir", MESSAGES[:3])
    server = Pop3ShieldServer(shutdown_grace=3.0)
    server.start(tmp_path / "run", {"alice": PASSWORD, "bob": PASSWORD}, root)
    proc = server.proc
    try:
        lingering = _login(server, "alice")  # DELE pending when the grace runs out: keeps its messages
        lingering.send(b"DELE 1\r\nDELE 2\r\n")
        assert [lingering.line(), lingering.line()] == [b"+OK Marked to be deleted.\r\n"] * 2
        finishing = _login(server, "bob")  # finishes within the grace: its QUIT's UPDATE runs
        finishing.send(b"DELE 1\r\n")
        assert finishing.line() == b"+OK Marked to be deleted.\r\n"
        sent = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        assert _wait_for(lambda: _refused(server), 5.0), "still accepting after SIGTERM"
        finishing.send(b"NOOP\r\nQUIT\r\n")
        assert finishing.line() == b"+OK\r\n"
        assert finishing.line() == b"+OK Logging out.\r\n"
        assert proc.poll() is None  # alice is still in her session: the server waits
        assert lingering.line() == SHUTTING_DOWN  # when the grace is over
        assert time.monotonic() - sent >= 2.5
        assert lingering.closed()
        proc.wait(timeout=15)
    finally:
        server.stop()
    assert _messages(root / "alice" / "Maildir") == 3  # no QUIT, no UPDATE: nothing deleted
    assert _messages(root / "bob" / "Maildir") == 2
    log = server.log_path.read_text()
    # alice and bob, and on a loaded machine the first probe of _refused too when it connected
    # before the reactor got to the signal
    counted = re.search(r"shutting down: (\d+) sessions have 3 s to finish", log)
    assert counted and int(counted.group(1)) >= 2, [line for line in log.splitlines() if "shut" in line]
    assert "shutdown grace over: closing 1 sessions (nothing deleted)" in log
    assert "closed (server shutdown)" in log and "deleted=-" in log.split("closed (server shutdown)")[1]
    assert proc.returncode == 0


def test_sigterm_without_sessions_stops_at_once_and_a_second_one_ends_the_grace(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    write_maildir(root / "alice" / "Maildir", MESSAGES[:3])
    server = Pop3ShieldServer(shutdown_grace=60.0, stop_timeout=20.0)
    server.start(tmp_path / "run", {"alice": PASSWORD}, root)
    proc = server.proc
    try:
        client = _login(server, "alice")
        client.send(b"DELE 3\r\n")
        assert client.line().startswith(b"+OK")
        os.kill(proc.pid, signal.SIGTERM)
        assert _wait_for(lambda: "have 60 s to finish" in server.log_path.read_text(), 10.0)
        assert proc.poll() is None
        started = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        assert client.line() == SHUTTING_DOWN
        proc.wait(timeout=15)
        assert time.monotonic() - started < 10  # not the 60 s grace
    finally:
        server.stop()
    assert _messages(root / "alice" / "Maildir") == 3
    assert "SIGTERM again: ending the shutdown grace now" in server.log_path.read_text()

    ctrl_c = Pop3ShieldServer(shutdown_grace=60.0, stop_timeout=20.0)  # Ctrl-C twice, the same way
    ctrl_c.start(tmp_path / "run3", {"alice": PASSWORD}, root)
    try:
        client = _login(ctrl_c, "alice")
        os.kill(ctrl_c.proc.pid, signal.SIGINT)
        assert _wait_for(lambda: "have 60 s to finish" in ctrl_c.log_path.read_text(), 10.0)
        started = time.monotonic()
        os.kill(ctrl_c.proc.pid, signal.SIGINT)
        assert client.line() == SHUTTING_DOWN
        ctrl_c.proc.wait(15)
        assert time.monotonic() - started < 10
    finally:
        ctrl_c.stop()
    assert "SIGINT again: ending the shutdown grace now" in ctrl_c.log_path.read_text()

    idle = Pop3ShieldServer(shutdown_grace=60.0)
    idle.start(tmp_path / "run2", {"alice": PASSWORD}, root)
    started = time.monotonic()
    try:
        os.kill(idle.proc.pid, signal.SIGTERM)
        idle.proc.wait(timeout=15)
    finally:
        idle.stop()
    assert time.monotonic() - started < 10


def test_sighup_reloads_the_passwd_file_and_names_settings_that_need_a_restart(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    for user in ("alice", "carol"):
        write_maildir(root / user / "Maildir", MESSAGES[:3])
    server = Pop3ShieldServer()
    server.start(tmp_path / "run", {"alice": PASSWORD}, root)
    try:
        client = Client(server)
        client.send(f"USER carol\r\nPASS {PASSWORD}\r\n".encode())
        assert client.line() == b"+OK\r\n"
        assert client.line().startswith(b"-ERR [AUTH]")
        client.close()
        write_bcrypt_passwd(server.passwd_path, {"alice": PASSWORD, "carol": PASSWORD})
        conf = server.conf_path.read_text()
        server.conf_path.write_text(conf.replace('hostname = "test.invalid"', 'hostname = "other.invalid"')
                                    .replace("shutdown_grace = 1.0", "shutdown_grace = 2.0"))
        os.kill(server.proc.pid, signal.SIGHUP)
        line = f"SIGHUP: log and event files reopened; passwd file {server.passwd_path} reloaded (2 users); "
        assert _wait_for(lambda: line in server.log_path.read_text()), server.diagnostics()
        assert (f"changed in {server.conf_path}, needs a restart: server.hostname, server.shutdown_grace"
                in server.log_path.read_text())
        _login(server, "carol").close()  # the new user, without a restart
        assert Client(server).greeting == b"+OK test.invalid POP3 ready.\r\n"  # the running config stays
        server.passwd_path.write_text("broken line without a scheme\n")
        os.kill(server.proc.pid, signal.SIGHUP)
        assert _wait_for(lambda: "SIGHUP: passwd file not reloaded, keeping the previous users: "
                                 f"{server.passwd_path}:1:" in server.log_path.read_text()), server.diagnostics()
        closed = server.log_path.read_text().count(" closed (")
        _login(server, "carol").close()  # the previous users still serve
        assert _wait_for(lambda: server.log_path.read_text().count(" closed (") > closed)
        assert server.log_path.read_text().count("passwd file not reloaded") == 1  # the login does not repeat it
        assert server.proc.poll() is None
    finally:
        server.stop()


def _fingerprint(server: Pop3ShieldServer, ca: trustme.CA) -> str:
    client = Client(server)
    client.send(b"STLS\r\n")
    assert client.line() == b"+OK Begin TLS negotiation now.\r\n"
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with context.wrap_socket(client.sock, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
        tls.sendall(b"QUIT\r\n")
        assert tls.recv(100) == b"+OK Logging out.\r\n"
    return hashlib.sha256(der).hexdigest()


def test_sighup_rereads_the_certificate_and_keeps_the_old_one_when_the_new_is_broken(tmp_path: Path) -> None:
    ca = trustme.CA()
    root = tmp_path / "mail"
    write_maildir(root / "alice" / "Maildir", MESSAGES[:3])
    cert = tmp_path / "tls" / "server.pem"
    cert.parent.mkdir()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
    server = Pop3ShieldServer(extra_toml=f'[tls]\ncertificate = "{cert}"\n\n[protections.stls]\naction = "inactive"\n')
    server.start(tmp_path / "run", {"alice": PASSWORD}, root)
    try:
        first = _fingerprint(server, ca)
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
        assert _fingerprint(server, ca) == first  # read at start, not at each handshake
        os.kill(server.proc.pid, signal.SIGHUP)
        assert _wait_for(lambda: f"TLS certificate {cert} reloaded" in server.log_path.read_text())
        second = _fingerprint(server, ca)
        assert second != first
        cert.write_bytes(cert.read_bytes().split(b"-----BEGIN CERTIFICATE-----")[0])  # the key, no certificate
        os.kill(server.proc.pid, signal.SIGHUP)
        problem = (f"SIGHUP: TLS certificate not reloaded, keeping the previous one: {server.conf_path}: "
                   f"tls.certificate: {cert}: no PEM certificate in it")
        assert _wait_for(lambda: problem in server.log_path.read_text()), server.diagnostics()
        assert server.log_path.read_text().count(problem) == 1
        assert _fingerprint(server, ca) == second
    finally:
        server.stop()


def test_sighup_rereads_the_routing_map(tmp_path: Path) -> None:
    routes = tmp_path / "routes"
    routes.write_text("alice@example.test tcp:host=127.0.0.1:port=1\n")
    server = Pop3ShieldServer(local_passwd=False, backend_toml=f'[backend]\ntype = "upstream"\nroutes = "{routes}"\n')
    server.start(tmp_path / "run", {}, tmp_path / "mail")
    try:
        routes.write_text("alice@example.test tcp:host=127.0.0.1:port=1\n@example.org tcp:host=127.0.0.1:port=2\n")
        os.kill(server.proc.pid, signal.SIGHUP)
        assert _wait_for(lambda: f"routing map {routes} reloaded (2 routes)" in server.log_path.read_text()), \
            server.diagnostics()
        routes.write_text("@example.org nonsense\n")
        os.kill(server.proc.pid, signal.SIGHUP)
        assert _wait_for(lambda: "SIGHUP: routing map not reloaded, keeping the previous routes: "
                                 f"{routes}:1:" in server.log_path.read_text()), server.diagnostics()
        assert server.proc.poll() is None
    finally:
        server.stop()
