"""An implicit-TLS (ssl:) listener counts as TLS for the session, and the life cycle works the same
under ``twistd -n pop3shield`` (this checkout's plugin and code, via PYTHONPATH)."""

from __future__ import annotations

import poplib
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trustme

from tests.support import skip_or_fail
from tests.test_cli import _env, good_config, stop, wait_for_line


def test_an_ssl_listener_counts_as_tls(tmp_path: Path) -> None:
    """With disable_plaintext_auth and no loopback exemption, a login over ssl: still works, and
    CAPA there lists USER and SASL but no STLS (the session is already in TLS)."""
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    conf = good_config(tmp_path, listen=f"ssl:0:interface=127.0.0.1:privateKey={tmp_path / 'server.pem'}")
    conf.write_text(conf.read_text().replace("[auth]\n", "[auth]\ndisable_plaintext_auth = true\n"
                                                         "plaintext_auth_loopback = false\n")
                    + f'[tls]\ncertificate = "{tmp_path / "server.pem"}"\n[protections.stls]\naction = "inactive"\n')
    out = tmp_path / "out.txt"
    with open(out, "wb") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "pop3shield", "run", "--config", str(conf)], stdout=handle,
                                stderr=subprocess.STDOUT, env=_env(tmp_path), cwd=tmp_path)
    try:
        port = int(wait_for_line(out, r"listening on 127\.0\.0\.1:(\d+)", proc).group(1))
        context = ssl.create_default_context()
        ca.configure_trust(context)
        client = poplib.POP3_SSL("127.0.0.1", port, context=context, timeout=10)
        assert client.capa() == {"CAPA": [], "TOP": [], "UIDL": [], "RESP-CODES": [], "PIPELINING": [],
                                 "AUTH-RESP-CODE": [], "USER": [], "SASL": ["PLAIN", "LOGIN"]}
        client.user("alice")
        client.pass_("alice-pw")
        assert client.retr(1)[1] == [b"Subject: hi", b"", b"hello"]
        client.quit()
    finally:
        stop(proc)


def _twistd() -> str:
    path = shutil.which("twistd")
    if path is None:
        skip_or_fail("twistd is not installed")
    return path  # type: ignore[return-value]


def test_sighup_and_sigterm_under_twistd(tmp_path: Path) -> None:
    twistd = _twistd()
    conf = good_config(tmp_path)
    conf.write_text(conf.read_text().replace("[server]\n", "[server]\nshutdown_grace = 30\n"))
    log = tmp_path / "twistd.log"
    proc = subprocess.Popen([twistd, "-n", "--pidfile", "", "--logfile", str(log), "pop3shield", "--config",
                             str(conf)], env=_env(tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        port = int(wait_for_line(log, r"listening on 127\.0\.0\.1:(\d+)", proc).group(1))
        proc.send_signal(signal.SIGHUP)
        wait_for_line(log, r"SIGHUP: log and event files reopened; passwd file \S+ reloaded \(1 users\)", proc)
        assert proc.poll() is None  # SIGHUP did not kill it
        client = poplib.POP3("127.0.0.1", port, timeout=10)
        client.user("alice")
        client.pass_("alice-pw")
        client.dele(1)
        proc.send_signal(signal.SIGTERM)
        wait_for_line(log, r"shutting down: 1 sessions have 30 s to finish", proc)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        proc.send_signal(signal.SIGTERM)  # the second ends the grace
        started = time.monotonic()
        wait_for_line(log, r"shutdown grace over: closing 1 sessions", proc)
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\] Server shutting down"):
            client.noop()
        proc.wait(15)
        assert time.monotonic() - started < 10
    finally:
        stop(proc)
    assert len(list((tmp_path / "mail" / "alice" / "Maildir" / "new").iterdir())) == 1  # nothing deleted


def _served_fingerprint(port: int, ca: trustme.CA) -> str:
    import hashlib

    context = ssl.create_default_context()
    ca.configure_trust(context)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.recv(100) == b"+OK cli.test POP3 ready.\r\n"
            return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()


def test_an_ssl_listener_without_a_key_of_its_own_uses_tls_and_rereads_it_on_sighup(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
    conf = good_config(tmp_path, listen="ssl:0:interface=127.0.0.1")
    conf.write_text(conf.read_text() + f'[tls]\ncertificate = "{cert}"\n')
    out = tmp_path / "out.txt"
    with open(out, "wb") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "pop3shield", "run", "--config", str(conf)], stdout=handle,
                                stderr=subprocess.STDOUT, env=_env(tmp_path), cwd=tmp_path)
    try:
        port = int(wait_for_line(out, r"listening on 127\.0\.0\.1:(\d+)", proc).group(1))
        first = _served_fingerprint(port, ca)
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
        assert _served_fingerprint(port, ca) == first
        proc.send_signal(signal.SIGHUP)
        # every worker reloads on its own SIGHUP, passed on by the supervisor: until the last has
        # said so, a connection may still reach one that serves the old certificate
        from pop3shield.config import load_config

        workers = load_config(conf).server.workers
        reloaded = rf"TLS certificate {re.escape(str(cert))} reloaded"
        deadline = time.monotonic() + 30
        while len(re.findall(reloaded, out.read_text(errors="replace"))) < workers:
            assert time.monotonic() < deadline and proc.poll() is None, out.read_text(errors="replace")
            time.sleep(0.1)
        assert _served_fingerprint(port, ca) != first
        assert "warning" not in out.read_text()  # the certificate is used: no "unused" warning
    finally:
        stop(proc)
