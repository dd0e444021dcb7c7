"""pop3shield in upstream mode in front of a real, private Dovecot, driven by real clients.

The whole real-client suite of test_clients.py and test_nmap.py runs again here against a
``relay`` server kind: a pop3shield with ``[backend] type = "upstream"`` whose upstream is a
private Dovecot over the standard Maildir. The expectations are Dovecot's own (its sizes, its
UIDLs, its [IN-USE]), so a pass means the clients got through pop3shield exactly what Dovecot
gives them directly. Then what only a relay has: protections that fire before anything reaches
the upstream (checked on a recording relay between the two), the client's address in Dovecot's
log (XCLIENT and PROXY v2), verified TLS to the upstream, and a broken upstream.
"""

from __future__ import annotations

import contextlib
import os
import poplib
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import trustme

from tests.interop.conftest import QUIRKS, USER, PASSWORD, Mailbox
from tests.interop.test_clients import (  # noqa: F401 - collected here against the relay
    login,
    login_when_free,
    test_client_retrieves_every_message_byte_exact,
    test_curl_list_matches_sizes,
    test_dele_then_quit_deletes_exactly_those,
    test_dele_then_rset_keeps_everything,
    test_dropped_connection_after_dele_deletes_nothing,
    test_retr_each_message,
    test_second_concurrent_login_gets_in_use,
    test_stat_and_list,
    test_top,
    test_uidl_stable_across_sessions,
)
from tests.interop.test_nmap import test_nmap_pop3_capabilities_with_service_detection  # noqa: F401
from tests.support.clients import Pop3Relay
from tests.support.dovecot import DovecotServer
from tests.support.messages import MESSAGES, TestMessage, write_maildir
from tests.support.pop3shield_server import Pop3ShieldServer

TIMEOUT = 30


class RelayServers:
    """A Dovecot and the pop3shield in front of it; stops both."""

    def __init__(self, dovecot: DovecotServer, shield: Pop3ShieldServer, recorder: Pop3Relay | None = None):
        self.dovecot = dovecot
        self.shield = shield
        self.recorder = recorder

    def events(self) -> list[dict]:
        return self.shield.events()

    def diagnostics(self) -> str:
        return self.shield.diagnostics() + "\n" + self.dovecot.diagnostics()

    def stop(self) -> None:
        self.shield.stop()
        if self.recorder is not None:
            self.recorder.close()
        self.dovecot.stop()


def backend_toml(host: str, port: int, extra: str = "") -> str:
    return f'[backend]\ntype = "upstream"\nendpoint = "tcp:host={host}:port={port}"\n{extra}'


def start_relay(workdir: Path, messages=MESSAGES, *, dovecot: dict | None = None, backend_extra: str = "",
                recorder: bool = False, endpoint_port: str | None = None, **shield) -> Mailbox:
    """Dovecot over the standard Maildir, pop3shield (upstream mode) in front, optionally a
    recording relay between the two."""
    maildir_root = workdir / "mail"
    maildir = maildir_root / USER / "Maildir"
    write_maildir(maildir, messages)
    dv = DovecotServer(**(dovecot or {}))
    dv.start(workdir / "dovecot", {USER: PASSWORD}, maildir_root)
    rec = None
    try:
        port = dv.port
        if endpoint_port == "proxy":
            port = dv.proxy_port
        if recorder:
            rec = Pop3Relay(dv.host, port).__enter__()
            port = rec.port
        ps = Pop3ShieldServer(backend_toml=backend_toml(dv.host, port, backend_extra),
                              local_passwd=shield.pop("local_passwd", False), **shield)
        host, sport = ps.start(workdir / "pop3shield", {USER: PASSWORD}, workdir / "unused")
    except BaseException:
        if rec is not None:
            rec.close()
        dv.stop()
        raise
    return Mailbox(kind="relay", host=host, port=sport, user=USER, password=PASSWORD,
                   server=RelayServers(dv, ps, rec), maildir=maildir, messages=tuple(messages),
                   workdir=workdir, quirks=dict(QUIRKS["dovecot"]))


def no_security_events(box: Mailbox) -> None:
    events = [e for e in box.server.events() if e.get("type") == "security"]
    assert events == [], f"legitimate clients produced security events: {events}"


# -- the fixtures the imported tests use, for the relay kind ------------------------------

@pytest.fixture(scope="module")
def server_kind() -> str:
    return "relay"


@pytest.fixture(scope="module")
def shared_mailbox(tmp_path_factory):
    box = start_relay(tmp_path_factory.mktemp("shared-relay"))
    try:
        yield box
    finally:
        box.server.stop()
    no_security_events(box)


@pytest.fixture
def fresh_mailbox(tmp_path, request):
    box = start_relay(tmp_path)
    request.node._interop_mailbox = box
    try:
        yield box
    finally:
        box.server.stop()
    no_security_events(box)


@pytest.fixture
def scanned(tmp_path, request):
    box = start_relay(tmp_path)
    request.node._interop_mailbox = box
    try:
        yield box
    finally:
        box.server.stop()


# -- side by side with Dovecot directly -----------------------------------------------------

def everything(host: str, port: int) -> tuple:
    conn = poplib.POP3(host, port, timeout=TIMEOUT)
    try:
        conn.user(USER)
        conn.pass_(PASSWORD)
        stat = conn.stat()
        listing = conn.list()[1]
        uidl = conn.uidl()[1]
        bodies = [conn.retr(n)[1] for n in range(1, stat[0] + 1)]
        tops = [conn.top(n, 1)[1] for n in range(1, stat[0] + 1)]
        conn.quit()
        return stat, listing, uidl, bodies, tops
    finally:
        conn.close()


def test_byte_identical_to_dovecot_directly(fresh_mailbox) -> None:
    box = fresh_mailbox
    direct = everything(box.server.dovecot.host, box.server.dovecot.port)
    relayed = everything(box.host, box.port)
    assert relayed == direct


# -- protections fire before anything reaches the upstream -----------------------------------

ATTACKS = [
    (b"USER " + b"A" * 300 + b"\r\n", "max_line_length"),
    (b"USER alice\r\nPASS " + b"\x90" * 64 + b"\x31\xc0\x50\x68//sh\x68/bin\x89\xe3\xcd\x80\r\n", None),
    (b"STLS\r\n", "stls"),
    (b"USER \r\n", None),
    (b"GET / HTTP/1.1\r\n", "non_compliant"),
    (b"USER alice\r\nPASS \r\n", "empty_password"),
    (b"FOO\r\n" * 11, "max_bad_commands"),
    (b"CAPA\r\n" * 51, "max_commands"),
]
#: every protection, each fired by one of the attacks above
PROTECTIONS = {"max_line_length", "malicious_code", "stls", "empty_username", "empty_password",
               "non_compliant", "max_bad_commands", "max_commands"}


def _exchange(host: str, port: int, data: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=TIMEOUT) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(data)
        out = b""
        with contextlib.suppress(OSError):
            while chunk := f.read1(4096):
                out += chunk
        return out


def test_protections_fire_before_the_upstream(tmp_path) -> None:
    box = start_relay(tmp_path, recorder=True)
    try:
        for attack, protection in ATTACKS:
            reply = _exchange(box.host, box.port, attack)
            assert b"-ERR" in reply, (attack[:40], reply)
        recorder = box.server.recorder
        # not one connection to the upstream: nothing logged in, nothing was relayed
        assert recorder.sessions == [], recorder.client_lines()
        events = {e["protection"] for e in box.server.events() if e.get("type") == "security"}
        assert events == PROTECTIONS
        assert "Login: user=<alice>" not in Path(box.server.dovecot.log_path).read_text()

        # after login: a refused command is not relayed, and the dropped session sends no QUIT
        reply = _exchange(box.host, box.port, b"USER alice\r\nPASS " + PASSWORD.encode()
                          + b"\r\nDELE 1\r\nRETR -1\r\n")
        assert reply.split(b"\r\n")[:2] == [b"+OK", b"+OK Logged in."] or reply.startswith(b"+OK")
        assert b"-ERR" in reply
        time.sleep(0.5)
        lines = [line for session in recorder.client_lines() for line in session]
        assert not any(line.startswith(("RETR -1", "DELE", "QUIT")) for line in lines), lines
        conn = login_when_free(box)
        assert conn.stat()[0] == len(MESSAGES)
        conn.quit()
    finally:
        box.server.stop()


# -- the client's address reaches Dovecot -----------------------------------------------------

def _login_from(source: str, box: Mailbox) -> None:
    s = socket.create_connection((box.host, box.port), timeout=TIMEOUT, source_address=(source, 0))
    conn = poplib.POP3.__new__(poplib.POP3)
    conn.host, conn.port, conn._tls_established = box.host, box.port, False
    conn.sock, conn.file, conn._debugging = s, s.makefile("rb"), 0
    conn.welcome = conn._getresp()
    conn.user(USER)
    conn.pass_(PASSWORD)
    conn.quit()


@pytest.mark.parametrize("mode", ["xclient", "proxy"])
def test_client_address_in_dovecots_log(tmp_path, mode) -> None:
    box = start_relay(tmp_path, dovecot={"trusted_networks": "127.0.0.1/32", "haproxy": True},
                      backend_extra=f'client_address = "{mode}"\n',
                      endpoint_port="proxy" if mode == "proxy" else None)
    try:
        _login_from("127.0.0.2", box)
        log = Path(box.server.dovecot.log_path)
        deadline = time.monotonic() + 5
        while "rip=127.0.0.2" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert re.search(r"Login: user=<alice>, method=\S+, rip=127\.0\.0\.2, ", log.read_text()), log.read_text()
    finally:
        box.server.stop()


# -- TLS to the upstream ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    cert = ca.issue_cert("mail.test.invalid")
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(d / "other.pem"))
    return {name: str(d / f"{name}.pem") for name in ("cert", "key", "ca", "other")}


@pytest.mark.parametrize("ca, name, works", [
    ("ca", "mail.test.invalid", True),
    ("ca", "wrong.test.invalid", False),
    ("other", "mail.test.invalid", False),
])
def test_stls_to_the_upstream_is_verified(tmp_path, certificates, ca, name, works) -> None:
    box = start_relay(tmp_path, dovecot={"tls": (certificates["cert"], certificates["key"])},
                      backend_extra=f'stls = true\nca_file = "{certificates[ca]}"\ntls_hostname = "{name}"\n')
    try:
        conn = poplib.POP3(box.host, box.port, timeout=TIMEOUT)
        conn.user(USER)
        if works:
            conn.pass_(PASSWORD)
            assert conn.stat()[0] == len(MESSAGES)
            conn.quit()
        else:
            with pytest.raises(poplib.error_proto) as caught:
                conn.pass_(PASSWORD)
            assert caught.value.args[0].startswith(b"-ERR [SYS/TEMP]")
            conn.close()
            log = Path(box.server.dovecot.log_path).read_text()
            assert "Login: user=<alice>" not in log  # the password never went upstream
    finally:
        box.server.stop()


# -- a broken upstream: the front-end stays up and serves the next session ---------------------

class FakeUpstream:
    """A loopback listener whose every connection gets ``script(sock)``."""

    def __init__(self, script) -> None:
        self.script = script
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            self.script(conn)
            conn.settimeout(5)
            while conn.recv(4096):
                pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(5)


def _garbage(conn):
    conn.sendall(b"\x16\x03\x01\x02\x00garbage\r\n")


def _huge(conn):
    conn.sendall(b"+OK " + b"x" * (10 * 1024 * 1024) + b"\r\n")


def _silent(conn):
    time.sleep(6)


@pytest.mark.parametrize("script", [_garbage, _huge, _silent], ids=["garbage", "10MB-line", "never-answering"])
def test_broken_upstream_gives_sys_temp_and_the_server_stays_up(tmp_path, script) -> None:
    fake = FakeUpstream(script)
    box = start_relay(tmp_path, backend_extra="login_timeout = 2.0\n")
    shield = box.server.shield
    try:
        # point a second pop3shield at the fake (the first, at Dovecot, proves it still serves)
        bad = Pop3ShieldServer(backend_toml=backend_toml("127.0.0.1", fake.port, "login_timeout = 2.0\n"),
                               local_passwd=False)
        host, port = bad.start(tmp_path / "bad", {USER: PASSWORD}, tmp_path / "unused2")
        try:
            started = time.monotonic()
            conn = poplib.POP3(host, port, timeout=TIMEOUT)
            conn.user(USER)
            with pytest.raises(poplib.error_proto) as caught:
                conn.pass_(PASSWORD)
            assert caught.value.args[0].startswith(b"-ERR [SYS/TEMP]"), caught.value.args[0]
            assert time.monotonic() - started < 10
            conn.close()
            assert bad.proc is not None and bad.proc.poll() is None
            again = poplib.POP3(host, port, timeout=TIMEOUT)  # still answering
            assert again.getwelcome().startswith(b"+OK")
            again.close()
        finally:
            bad.stop()
        assert shield.proc is not None and shield.proc.poll() is None
    finally:
        box.server.stop()
        fake.close()


def test_upstream_down_then_back(tmp_path) -> None:
    box = start_relay(tmp_path)
    dv = box.server.dovecot
    try:
        dv.stop()
        conn = poplib.POP3(box.host, box.port, timeout=TIMEOUT)
        conn.user(USER)
        with pytest.raises(poplib.error_proto) as caught:
            conn.pass_(PASSWORD)
        assert caught.value.args[0].startswith(b"-ERR [SYS/TEMP]")
        conn.close()
        back = DovecotServer(port=dv.port)
        back.start(tmp_path / "dovecot2", {USER: PASSWORD}, tmp_path / "mail")
        box.server.dovecot = back
        conn = login_when_free(box)
        assert conn.stat()[0] == len(MESSAGES)
        conn.quit()
    finally:
        box.server.stop()


def test_upstream_killed_mid_retr(tmp_path) -> None:
    # bigger than every socket buffer between Dovecot and the client, so the kill lands mid-body
    line = b"0123456789" * 7 + b"\r\n"
    huge = TestMessage("huge", b"Subject: huge\r\nX-Test-Id: huge\r\n\r\n" + line * (48 * 1024 * 1024 // len(line)),
                       "48 MiB")
    box = start_relay(tmp_path, (*MESSAGES[:2], huge))
    try:
        s = socket.create_connection((box.host, box.port), timeout=TIMEOUT)
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\n")
        assert f.readline().startswith(b"+OK") and f.readline().startswith(b"+OK")
        log = Path(box.server.dovecot.log_path)
        mpid = int(re.search(r"Login: user=<alice>.* mpid=(\d+)", log.read_text()).group(1))
        s.sendall(b"RETR 3\r\n")  # the 48 MiB message
        assert f.readline().startswith(b"+OK")
        f.read(8192)  # a little, then the client stalls: pop3shield stops reading upstream
        time.sleep(0.5)
        os.kill(mpid, signal.SIGKILL)  # Dovecot's pop3 process for this session (ours to kill)
        rest = b""
        with contextlib.suppress(OSError):
            while chunk := f.read1(65536):
                rest += chunk
        assert not rest.endswith(b"\r\n.\r\n"), "the cut message must not look complete"
        assert len(rest) < len(huge.wire)
        s.close()
        conn = login_when_free(box)  # the next session works
        assert conn.stat()[0] == 3
        conn.quit()
    finally:
        box.server.stop()


def test_dovecots_in_use_reaches_the_client_with_its_code(tmp_path) -> None:
    box = start_relay(tmp_path)
    try:
        first = login(box)
        second = poplib.POP3(box.host, box.port, timeout=TIMEOUT)
        second.user(USER)
        with pytest.raises(poplib.error_proto) as caught:
            second.pass_(PASSWORD)
        assert caught.value.args[0].startswith(b"-ERR [IN-USE]")
        second.close()
        first.quit()
    finally:
        box.server.stop()


def test_unknown_route_is_refused_like_a_wrong_password(tmp_path) -> None:
    routes = tmp_path / "routes"
    routes.write_text("# nobody yet\n")
    box = start_relay(tmp_path)
    try:
        # a second instance with only a map (no default), mapping nobody
        only_map = Pop3ShieldServer(backend_toml=f'[backend]\ntype = "upstream"\nroutes = "{routes}"\n',
                                    local_passwd=False, server_toml="auth_failure_delay = 1.0")
        host, port = only_map.start(tmp_path / "map", {USER: PASSWORD}, tmp_path / "unused3")
        try:
            conn = poplib.POP3(host, port, timeout=TIMEOUT)
            conn.user(USER)
            started = time.monotonic()
            with pytest.raises(poplib.error_proto) as caught:
                conn.pass_(PASSWORD)
            elapsed = time.monotonic() - started
            assert caught.value.args[0].startswith(b"-ERR [AUTH]")
            assert elapsed >= 0.9, elapsed  # the failure delay, as for a wrong password
            conn.close()
            routes.write_text(f"alice tcp:host=127.0.0.1:port={box.server.dovecot.port}\n")
            conn = login_when_free(type("B", (), {"host": host, "port": port, "user": USER,
                                                  "password": PASSWORD})())
            assert conn.stat()[0] == len(MESSAGES)
            conn.quit()
        finally:
            only_map.stop()
    finally:
        box.server.stop()



# -- a hostile upstream mid-session: both sides closed, and an event -----------------------------

def _lines(conn: socket.socket):
    """The client's command lines, one at a time (a tiny scripted POP3 server)."""
    buffer = b""
    while True:
        while b"\r\n" not in buffer:
            data = conn.recv(4096)
            if not data:
                return
            buffer += data
        line, buffer = buffer.split(b"\r\n", 1)
        yield line


def _logs_in_then(retr_answer: bytes):
    """An upstream that logs alice in with one 22-octet message, then answers RETR with ``retr_answer``."""
    def script(conn: socket.socket) -> None:
        conn.sendall(b"+OK fake ready\r\n")
        for line in _lines(conn):
            word = line.split(b" ", 1)[0].upper()
            if word == b"CAPA":
                conn.sendall(b"+OK\r\nUSER\r\nUIDL\r\n.\r\n")
            elif word in (b"USER", b"PASS"):
                conn.sendall(b"+OK\r\n")
            elif word == b"STAT":
                conn.sendall(b"+OK 1 22\r\n")
            elif word == b"LIST":
                conn.sendall(b"+OK\r\n1 22\r\n.\r\n")
            elif word == b"UIDL":
                conn.sendall(b"+OK\r\n1 uid-one\r\n.\r\n")
            elif word == b"RETR":
                conn.sendall(retr_answer)
                return
            else:
                conn.sendall(b"-ERR unexpected\r\n")
    return script


@pytest.mark.parametrize("answer, first_byte_out", [
    (b"+OK " + b"x" * 600 + b"\r\n", False),           # a status line over RFC 2449's 512 octets
    (b"+OK\x00 injected\r\n", False),                   # a NUL in the status line
    # a NUL inside the body: its status line is held until the end of the upstream read that
    # brought it, so when both came in one read nothing went out yet and the -ERR is the answer;
    # when they came apart, the status line is out and the connection is cut
    (b"+OK\r\nSubject: hi\r\n\r\nbo\x00dy\r\n.\r\n", None),
], ids=["long-status", "nul-status", "nul-body"])
def test_hostile_upstream_mid_session_closes_both_sides_with_an_event(tmp_path, answer, first_byte_out) -> None:
    fake = FakeUpstream(_logs_in_then(answer))
    shield = Pop3ShieldServer(backend_toml=backend_toml("127.0.0.1", fake.port, "response_timeout = 5.0\n"),
                              local_passwd=False)
    try:
        host, port = shield.start(tmp_path / "run", {USER: PASSWORD}, tmp_path / "unused")
        with socket.create_connection((host, port), timeout=TIMEOUT) as client:
            reader = client.makefile("rb")
            assert reader.readline().startswith(b"+OK")
            client.sendall(f"USER {USER}\r\nPASS {PASSWORD}\r\n".encode())
            assert reader.readline() == b"+OK\r\n"
            assert reader.readline().startswith(b"+OK Logged in")
            client.sendall(b"RETR 1\r\n")
            rest = b""
            with contextlib.suppress(ConnectionResetError):  # mid-message the connection is cut (RST)
                while chunk := reader.read1(65536):
                    rest += chunk
        if first_byte_out is None:
            first_byte_out = not rest.startswith(b"-ERR")
        if first_byte_out:
            # whatever arrived before the cut: a prefix of the message, never the NUL, never an end
            assert (b"+OK 22 octets\r\nSubject: hi\r\n").startswith(rest[:29]) and not rest.endswith(b".\r\n")
            assert b"\x00" not in rest
        else:
            assert rest == b"-ERR [SYS/TEMP] Temporary server problem, try again later.\r\n"
        deadline = time.monotonic() + 10
        while not [e for e in shield.events() if e.get("type") == "backend"] and time.monotonic() < deadline:
            time.sleep(0.05)
        [event] = [e for e in shield.events() if e.get("type") == "backend"]
        assert event["user"] == USER and event["action"] == "closed"
        assert event["client"]["address"] == "127.0.0.1"
        assert "RETR 1" in event["reason"]
        assert shield.proc is not None and shield.proc.poll() is None  # the front-end stays up
    finally:
        shield.stop()
        fake.close()


def test_upstream_latency_and_errors_reach_the_metrics(tmp_path) -> None:
    """The relay's upstream round trips and failures are counted where operators scrape them."""
    from tests.test_metrics import _metrics_address, samples, scrape

    box = start_relay(tmp_path, extra_toml='[metrics]\nlisten = "tcp:0:interface=127.0.0.1"\n')
    try:
        host, port, _ = _metrics_address(box.server.shield)
        conn = poplib.POP3(box.host, box.port, timeout=TIMEOUT)
        conn.user(USER)
        conn.pass_(PASSWORD)
        conn.retr(1)
        conn.quit()
        wrong = poplib.POP3(box.host, box.port, timeout=TIMEOUT)
        wrong.user(USER)
        with pytest.raises(poplib.error_proto):
            wrong.pass_("not-the-password")
        wrong.close()
        box.server.dovecot.stop()
        down = poplib.POP3(box.host, box.port, timeout=TIMEOUT)
        down.user(USER)
        with pytest.raises(poplib.error_proto):
            down.pass_(PASSWORD)
        down.close()
        values = samples(scrape(host, port))
        # one login and one RETR round trip measured; a refused password and a refused connection counted
        assert values[("pop3shield_upstream_seconds_count", ())] == 2
        assert values[("pop3shield_upstream_errors_total", (("reason", "auth"),))] == 1
        assert values[("pop3shield_upstream_errors_total", (("reason", "connect"),))] == 1
    finally:
        box.server.stop()
