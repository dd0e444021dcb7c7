"""STLS terminated in pop3shield, over real sockets with real TLS (trustme certificates).

A real server subprocess, real clients (poplib's ``stls()``, curl ``--ssl-reqd``, mpop
``--tls-starttls=on``), CAPA bytes before and after TLS asserted exactly, the CVE-2011-0411
injection, Dovecot's plaintext-auth refusal, and a protection applying inside TLS.
"""

from __future__ import annotations

import poplib
import sys
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.support import require_binary
from tests.support.clients import _maildir_messages, _private_env, _run, _write_private, lf_to_crlf
from tests.support.messages import MESSAGES, expected_wire, write_maildir
from tests.support.pop3shield_server import Pop3ShieldServer
from tests.support.raw import PASSWORD

CAPA_HEAD = (b"+OK Capability list follows\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n"
             b"AUTH-RESP-CODE\r\n")
CAPA_BEFORE = CAPA_HEAD + b"STLS\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n"
CAPA_AFTER = CAPA_HEAD + b"USER\r\nSASL PLAIN LOGIN\r\n.\r\n"
CAPA_BEFORE_NO_PLAINTEXT = CAPA_HEAD + b"STLS\r\n.\r\n"
BEGIN = b"+OK Begin TLS negotiation now.\r\n"
REFUSED = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_files(ca: trustme.CA, directory: Path, name: str = "server") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.pem"
    # a CN besides the SANs: fetchmail checks the subject's CN
    ca.issue_cert("127.0.0.1", "localhost", common_name="localhost").private_key_and_cert_chain_pem.write_to_path(
        str(path))
    return path


def start(tmp_path: Path, ca: trustme.CA, *, stls: str = "inactive", non_compliant: str = "prevent",
          auth_toml: str = "", extra_tls: str = "", **kwargs: Any) -> Pop3ShieldServer:
    root = tmp_path / "mail"
    write_maildir(root / "alice" / "Maildir", MESSAGES[:3])
    cert = tls_files(ca, tmp_path / "tls")
    server = Pop3ShieldServer(extra_toml=f"""
[tls]
certificate = "{cert}"
{extra_tls}

[protections.stls]
action = "{stls}"

[protections.non_compliant]
action = "{non_compliant}"
""", auth_toml=auth_toml, **kwargs)
    server.start(tmp_path / "run", {"alice": PASSWORD}, root)
    return server


class Wire:
    """A raw connection that can start TLS in place: exact bytes out and in."""

    def __init__(self, server: Pop3ShieldServer) -> None:
        self.sock: Any = socket.create_connection((server.host, server.port), timeout=10)
        self.buffer = b""
        self.greeting = self.line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; pending {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line + b"\r\n"

    def multiline(self) -> bytes:
        out = self.line()
        while not out.endswith(b"\r\n.\r\n"):
            out += self.line()
        return out

    def start_tls(self, ca: trustme.CA) -> None:
        assert self.buffer == b"", self.buffer  # nothing may have come after +OK in plaintext
        context = ssl.create_default_context()
        ca.configure_trust(context)
        self.sock = context.wrap_socket(self.sock, server_hostname="127.0.0.1")

    def quiet(self, wait: float = 1.0) -> bytes:
        """What arrives within ``wait`` seconds (the server should send nothing)."""
        self.sock.settimeout(wait)
        try:
            chunk = self.sock.recv(65536)
        except (socket.timeout, ssl.SSLWantReadError):
            chunk = b""
        finally:
            self.sock.settimeout(10)
        return self.buffer + chunk

    def close(self) -> None:
        self.sock.close()


def test_capa_offers_stls_before_tls_and_not_after(tmp_path: Path, ca: trustme.CA) -> None:
    server = start(tmp_path, ca, stls="detect")
    try:
        wire = Wire(server)
        wire.send(b"CAPA\r\n")
        assert wire.multiline() == CAPA_BEFORE
        wire.send(b"STLS\r\n")
        assert wire.line() == BEGIN
        wire.start_tls(ca)
        assert wire.sock.version() in ("TLSv1.2", "TLSv1.3")
        wire.send(b"CAPA\r\n")
        assert wire.multiline() == CAPA_AFTER
        wire.send(b"STLS\r\n")
        assert wire.line() == b"-ERR TLS is already active.\r\n"
        wire.send(b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\n")
        assert wire.line() == b"+OK\r\n"
        assert wire.line() == b"+OK Logged in, 3 messages (%d octets).\r\n" % sum(
            len(expected_wire(m)) for m in MESSAGES[:3])
        wire.send(b"STLS\r\n")
        assert wire.line() == b"-ERR TLS is already active.\r\n"
        wire.send(b"QUIT\r\n")
        assert wire.line() == b"+OK Logging out.\r\n"
        wire.close()
        events = [e for e in server.events() if e.get("type") == "security"]
        assert [(e["protection"], e["action"]) for e in events] == [("stls", "detect")]
        assert events[0]["attack_info"] == "Illegal POP3 TLS session"
    finally:
        server.stop()


def test_prevent_refuses_stls_as_today(tmp_path: Path, ca: trustme.CA) -> None:
    server = start(tmp_path, ca, stls="prevent")
    try:
        wire = Wire(server)
        wire.send(b"CAPA\r\n")
        assert wire.multiline() == CAPA_AFTER  # no STLS line
        wire.send(b"STLS\r\n")
        assert wire.line() == b"-ERR STLS is not available.\r\n"
        wire.send(b"NOOP\r\n")
        assert wire.line() == b"-ERR Unknown command.\r\n"  # still plaintext, still open
        wire.close()
    finally:
        server.stop()


@pytest.mark.parametrize("non_compliant", ["prevent", "detect"])
def test_input_pipelined_after_stls_is_never_run(tmp_path: Path, ca: trustme.CA, non_compliant: str) -> None:
    """CVE-2011-0411: ``STLS\\r\\nCAPA\\r\\n`` in one write; no CAPA reply, in plaintext or in TLS."""
    server = start(tmp_path, ca, non_compliant=non_compliant)
    try:
        wire = Wire(server)
        wire.send(b"STLS\r\nCAPA\r\n")
        if non_compliant == "prevent":
            assert wire.line() == b"-ERR Protocol violation.\r\n"
            wire.sock.settimeout(5)
            assert wire.sock.recv(100) == b""  # closed, TLS never started, no CAPA
        else:
            assert wire.line() == BEGIN
            wire.start_tls(ca)
            assert wire.quiet() == b""  # the discarded CAPA is not answered inside TLS either
            wire.send(b"NOOP\r\n")
            assert wire.line() == b"-ERR Unknown command.\r\n"  # the first line that came through TLS
        wire.close()
        events = [e for e in server.events() if e.get("type") == "security"]
        assert [(e["protection"], e["detail"].get("reason")) for e in events] == [
            ("non_compliant", "input pipelined after STLS")]
    finally:
        server.stop()


def test_plaintext_after_stls_before_the_handshake_breaks_it(tmp_path: Path, ca: trustme.CA) -> None:
    """Plaintext injected after +OK (a second segment) goes to the TLS layer: the handshake fails."""
    server = start(tmp_path, ca)
    try:
        wire = Wire(server)
        wire.send(b"STLS\r\n")
        assert wire.line() == BEGIN
        wire.send(b"CAPA\r\n")
        wire.sock.settimeout(5)
        data = b""
        try:
            while chunk := wire.sock.recv(4096):
                data += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        assert b"Capability" not in data and b"+OK" not in data
        wire.close()
    finally:
        server.stop()


def test_protections_apply_inside_tls(tmp_path: Path, ca: trustme.CA) -> None:
    server = start(tmp_path, ca)
    try:
        wire = Wire(server)
        wire.send(b"STLS\r\n")
        assert wire.line() == BEGIN
        wire.start_tls(ca)
        wire.send(b"USER \r\n")
        assert wire.line() == b"-ERR [AUTH] No username given.\r\n"
        wire.close()
        events = [e for e in server.events() if e.get("type") == "security"]
        assert [(e["protection"], e["action"], e["command"]) for e in events] == [
            ("empty_username", "prevent", "USER ")]
    finally:
        server.stop()


def test_disable_plaintext_auth(tmp_path: Path, ca: trustme.CA) -> None:
    """Loopback would be exempt by default: switched off here, so 127.0.0.1 must use TLS."""
    server = start(tmp_path, ca, auth_toml="disable_plaintext_auth = true\nplaintext_auth_loopback = false")
    try:
        wire = Wire(server)
        wire.send(b"CAPA\r\n")
        assert wire.multiline() == CAPA_BEFORE_NO_PLAINTEXT
        for line in (b"USER alice", b"PASS x", b"AUTH PLAIN"):
            wire.send(line + b"\r\n")
            assert wire.line() == REFUSED
        wire.send(b"STLS\r\n")
        assert wire.line() == BEGIN
        wire.start_tls(ca)
        wire.send(b"CAPA\r\n")
        assert wire.multiline() == CAPA_AFTER
        wire.send(b"USER alice\r\n")
        assert wire.line() == b"+OK\r\n"
        wire.close()
    finally:
        server.stop()


def test_plaintext_auth_from_loopback_is_exempt_by_default(tmp_path: Path, ca: trustme.CA) -> None:
    server = start(tmp_path, ca, auth_toml="disable_plaintext_auth = true")
    try:
        wire = Wire(server)
        wire.send(b"CAPA\r\n")
        assert wire.multiline() == CAPA_BEFORE
        wire.send(b"USER alice\r\n")
        assert wire.line() == b"+OK\r\n"
        wire.close()
    finally:
        server.stop()


def test_poplib_stls_login_and_retr(tmp_path: Path, ca: trustme.CA) -> None:
    server = start(tmp_path, ca, auth_toml="disable_plaintext_auth = true\nplaintext_auth_loopback = false")
    try:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        conn = poplib.POP3(server.host, server.port, timeout=30)
        try:
            assert "STLS" in conn.capa()
            assert conn.stls(context) == b"+OK Begin TLS negotiation now."
            assert "STLS" not in conn.capa()
            conn.user("alice")
            conn.pass_(PASSWORD)
            count, _ = conn.stat()
            assert count == 3
            got = [b"".join(line + b"\r\n" for line in conn.retr(i)[1]) for i in range(1, count + 1)]
            conn.quit()
        finally:
            conn.close()
        assert got == [expected_wire(m) for m in MESSAGES[:3]]
    finally:
        server.stop()


def test_curl_ssl_reqd(tmp_path: Path, ca: trustme.CA) -> None:
    curl = require_binary("curl")
    server = start(tmp_path, ca, auth_toml="disable_plaintext_auth = true\nplaintext_auth_loopback = false")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    try:
        base = [curl, "--disable", "--silent", "--show-error", "--fail", "--max-time", "30", "--noproxy", "*",
                "--ssl-reqd", "--cacert", str(ca_file), "--user", f"alice:{PASSWORD}"]
        env = _private_env(tmp_path / "curl")
        listing = _run(base + [f"pop3://127.0.0.1:{server.port}/"], env=env).stdout
        assert [line.split()[0] for line in listing.split(b"\r\n") if line] == [b"1", b"2", b"3"]
        body = _run(base + [f"pop3://127.0.0.1:{server.port}/2"], env=env).stdout
        assert body == expected_wire(MESSAGES[1])
    finally:
        server.stop()


def test_mpop_starttls(tmp_path: Path, ca: trustme.CA) -> None:
    mpop = require_binary("mpop")
    server = start(tmp_path, ca, auth_toml="disable_plaintext_auth = true\nplaintext_auth_loopback = false")
    home = tmp_path / "mpop"
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    maildir = home / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    conf = _write_private(home / "mpoprc", (
        "defaults\naccount test\nhost 127.0.0.1\n"
        f"port {server.port}\nuser alice\npassword {PASSWORD}\nauth user\n"
        f"tls on\ntls_starttls on\ntls_trust_file {ca_file}\n"
        "keep on\nonly_new off\nreceived_header off\n"
        f"uidls_file {home / 'uidls'}\ndelivery maildir {maildir}\ntimeout 30\n"))
    try:
        run = _run([mpop, "-C", str(conf), "--debug", "test"], env=_private_env(home))
        assert b"STLS" in run.stdout + run.stderr
        assert [lf_to_crlf(m) for m in _maildir_messages(maildir)] == [
            expected_wire(m) for m in MESSAGES[:3]]
    finally:
        server.stop()


def test_min_version(tmp_path: Path, ca: trustme.CA) -> None:
    """tls.min_version = "1.3": a TLS 1.2 client is refused, a default one gets TLS 1.3."""
    server = start(tmp_path, ca, extra_tls='min_version = "1.3"')
    try:
        for maximum in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.MAXIMUM_SUPPORTED):
            wire = Wire(server)
            wire.send(b"STLS\r\n")
            assert wire.line() == BEGIN
            context = ssl.create_default_context()
            ca.configure_trust(context)
            context.maximum_version = maximum
            if maximum is ssl.TLSVersion.TLSv1_2:
                with pytest.raises((ssl.SSLError, ConnectionResetError)):
                    context.wrap_socket(wire.sock, server_hostname="127.0.0.1")
            else:
                wire.sock = context.wrap_socket(wire.sock, server_hostname="127.0.0.1")
                assert wire.sock.version() == "TLSv1.3"
                wire.send(b"CAPA\r\n")
                assert wire.multiline() == CAPA_AFTER
            wire.close()
    finally:
        server.stop()


def test_safe_defaults(tmp_path: Path, ca: trustme.CA) -> None:
    """TLS 1.2 at least, no compression, the server's cipher order; a key that does not fit is refused."""
    from OpenSSL import SSL

    from pop3shield.config import TLSConfig
    from pop3shield.tls import CertificateError, load_options

    cert = tls_files(ca, tmp_path)
    flags = load_options(TLSConfig(certificate=str(cert))).getContext().set_options(0)
    for flag in (SSL.OP_NO_SSLv2, SSL.OP_NO_SSLv3, SSL.OP_NO_TLSv1, SSL.OP_NO_TLSv1_1, SSL.OP_NO_COMPRESSION,
                 SSL.OP_CIPHER_SERVER_PREFERENCE):
        assert flags & flag == flag, hex(flag)
    key = tmp_path / "other-key.pem"
    ca.issue_cert("other.invalid").private_key_pem.write_to_path(str(key))
    with pytest.raises(CertificateError) as info:
        load_options(TLSConfig(certificate=str(cert), private_key=str(key)))
    assert info.value.key == "tls.private_key" and "does not fit" in info.value.problem


def test_fetchmail_negotiates_stls(tmp_path: Path, ca: trustme.CA) -> None:
    """fetchmail's default (``sslproto auto``) uses STLS when CAPA offers it; the CA via ``sslcertfile``."""
    from tests.support.clients import _MDA_SCRIPT, _local_user

    fetchmail = require_binary("fetchmail")
    server = start(tmp_path, ca, auth_toml="disable_plaintext_auth = true\nplaintext_auth_loopback = false")
    home = tmp_path / "fetchmail"
    (home / "fm").mkdir(parents=True, mode=0o700)
    outdir = home / "delivered"
    outdir.mkdir()
    mda = home / "mda.py"
    mda.write_text(_MDA_SCRIPT.format(python=sys.executable))
    mda.chmod(0o700)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    rc = _write_private(home / "fetchmailrc", (
        "set no syslog\nset invisible\n"
        f"poll 127.0.0.1 with proto POP3 port {server.port}\n"
        f"  user \"alice\" there with password \"{PASSWORD}\" is \"{_local_user()}\" here\n"
        f"  options keep fetchall no rewrite sslcertck sslcertfile \"{ca_file}\" sslcommonname localhost\n"
        f"  mda \"{mda} {outdir}\"\n"))
    try:
        run = _run([fetchmail, "--nodetach", "--fetchmailrc", str(rc), "-v", "--pidfile", str(home / "fm" / "pid")],
                   env=_private_env(home, FETCHMAILHOME=str(home / "fm")))
        assert b"STLS" in run.stdout + run.stderr
        got = [lf_to_crlf(p.read_bytes()) for p in sorted(outdir.glob("*.eml"))]
        assert got == [expected_wire(m) for m in MESSAGES[:3]]
    finally:
        server.stop()
