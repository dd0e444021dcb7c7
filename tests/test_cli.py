"""The ``pop3shield`` command and the twistd plugin, run as real processes."""

from __future__ import annotations

import os
import poplib
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pop3shield.passwd import load_passwd, verify_password

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() == "true"


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = str(REPO)
    env["HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pop3shield", *args], input=stdin, capture_output=True,
                          text=True, timeout=60, env=_env(home), cwd=home)


def wait_for_line(path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 30) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        match = re.search(pattern, text)
        if match:
            return match
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} in {path}:\n{path.read_text(errors='replace') if path.exists() else ''}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def write_config(tmp_path: Path, body: str) -> Path:
    conf = tmp_path / "pop3shield.toml"
    conf.write_text(body, encoding="utf-8")
    return conf


def good_config(tmp_path: Path, listen: str = "tcp:0:interface=127.0.0.1") -> Path:
    passwd = tmp_path / "users.passwd"
    result = run_cli(tmp_path, "passwd", "alice", "--scheme", "BLF-CRYPT", "--file", str(passwd), "--stdin",
                     stdin="alice-pw\n")
    assert result.returncode == 0, result.stderr
    maildir = tmp_path / "mail" / "alice" / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    (maildir / "new" / "1700000000.M1P1.test").write_bytes(b"Subject: hi\n\nhello\n")
    return write_config(tmp_path, f'''
[server]
listen = ["{listen}"]
hostname = "cli.test"
[auth]
passwd_file = "users.passwd"
[backend]
type = "maildir"
maildir = "mail/{{user}}/Maildir"
[events]
path = "events.jsonl"
''')


def test_passwd_writes_a_verifiable_entry_and_never_echoes_the_password(tmp_path: Path) -> None:
    passwd = tmp_path / "users.passwd"
    result = run_cli(tmp_path, "passwd", "bob", "--file", str(passwd), "--stdin", stdin="s3cret pass\n")
    assert result.returncode == 0, result.stderr
    assert "s3cret" not in result.stdout + result.stderr
    entry = load_passwd(passwd)["bob"]
    assert entry.scheme == "ARGON2ID"
    assert verify_password(entry, b"s3cret pass")
    assert oct(passwd.stat().st_mode & 0o777) == "0o600"
    again = run_cli(tmp_path, "passwd", "bob", "--file", str(passwd), "--stdin", stdin="other\n")
    assert again.returncode == 0
    assert verify_password(load_passwd(passwd)["bob"], b"other")


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    conf = good_config(tmp_path)
    result = run_cli(tmp_path, "check-config", str(conf))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f"{conf}: OK")


@pytest.mark.parametrize("command", [("check-config",), ("run", "--config")])
def test_config_errors_stop_start_up_naming_file_key_and_problem(tmp_path: Path, command: tuple[str, ...]) -> None:
    conf = good_config(tmp_path)
    conf.write_text(conf.read_text().replace('hostname = "cli.test"', "idle_timeout = 30"))
    result = run_cli(tmp_path, *command, str(conf))
    assert result.returncode == 2
    assert result.stderr.startswith(f"pop3shield: {conf}: server.idle_timeout: ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_run_fails_loudly_when_the_port_is_taken(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        conf = good_config(tmp_path, listen=f"tcp:{port}:interface=127.0.0.1")
        proc = subprocess.Popen([sys.executable, "-m", "pop3shield", "run", "--config", str(conf)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(tmp_path), cwd=tmp_path)
        try:
            _, err = proc.communicate(timeout=30)
        finally:
            stop(proc)
    assert proc.returncode == 1
    assert f"cannot listen on 'tcp:{port}:interface=127.0.0.1'" in err.decode()


def test_demo_serves_mail_without_any_config(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    with open(out, "wb") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "pop3shield", "run", "--demo-dir", str(tmp_path / "demo"),
                                 "--listen", "tcp:0:interface=127.0.0.1"], stdout=handle,
                                stderr=subprocess.DEVNULL, env=_env(tmp_path), cwd=tmp_path)
    try:
        port = int(wait_for_line(out, r"listening on 127\.0\.0\.1:(\d+)", proc).group(1))
        password = wait_for_line(out, r"password '([^']+)'", proc).group(1)
        client = poplib.POP3("127.0.0.1", port, timeout=10)
        client.user("demo")
        client.pass_(password)
        count, _ = client.stat()
        assert count == 2
        body = b"\n".join(client.retr(2)[1])
        assert b"\n.\n" in body
        client.quit()
    finally:
        stop(proc)
    assert proc.returncode == 0


def _plugin_installed() -> bool:
    """Installed with `pip install .`, not just importable from this checkout."""
    if shutil.which("twistd") is None:
        return False
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([sys.executable, "-c", "import twisted.plugins.pop3shield_plugin"], cwd="/",
                           env=env, capture_output=True, timeout=60)
    return probe.returncode == 0


@pytest.mark.skipif(not _plugin_installed() and not IN_CI, reason="needs `pip install .` (the plugin file lives in "
                    "site-packages/twisted/plugins)")
def test_twistd_lists_and_runs_the_plugin(tmp_path: Path) -> None:
    env = _env(tmp_path)
    env.pop("PYTHONPATH")  # the installed package, as an operator would run it
    helptext = subprocess.run(["twistd", "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert re.search(r"^\s+pop3shield\s+pop3shield: a hardened POP3", helptext.stdout, re.M), helptext.stdout
    conf = good_config(tmp_path)
    log = tmp_path / "twistd.log"
    proc = subprocess.Popen(["twistd", "-n", "--pidfile", "", "--logfile", str(log), "pop3shield", "--config",
                             str(conf)], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port = int(wait_for_line(log, r"listening on 127\.0\.0\.1:(\d+)", proc).group(1))
        client = poplib.POP3("127.0.0.1", port, timeout=10)
        assert client.getwelcome() == b"+OK cli.test POP3 ready."
        client.user("alice")
        client.pass_("alice-pw")
        assert client.stat() == (1, 22)
        client.quit()
    finally:
        stop(proc)
    bad = subprocess.run(["twistd", "-n", "pop3shield", "--config", str(tmp_path / "missing.toml")],
                         capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert bad.returncode != 0
    assert f"{tmp_path / 'missing.toml'}: -: cannot read" in bad.stdout + bad.stderr


def test_check_config_names_a_broken_passwd_line(tmp_path: Path) -> None:
    conf = good_config(tmp_path)
    (tmp_path / "users.passwd").write_text("alice:nohash\n")
    result = run_cli(tmp_path, "check-config", str(conf))
    assert result.returncode == 2
    assert result.stderr.startswith(f"pop3shield: {tmp_path / 'users.passwd'}:1: ")


def test_unloadable_realm_is_a_config_error(tmp_path: Path) -> None:
    conf = good_config(tmp_path)
    conf.write_text(conf.read_text().replace("[auth]\n", '[auth]\nrealm = "no_such_module:Realm"\n'))
    result = run_cli(tmp_path, "run", "--config", str(conf))
    assert result.returncode == 2
    assert result.stderr.startswith(f"pop3shield: {conf}: auth.realm: cannot load 'no_such_module:Realm'")


def test_implicit_tls_on_an_ssl_endpoint(tmp_path: Path) -> None:
    """Port 995 style (RFC 8314): Twisted's ssl: endpoint, a certificate made here, poplib over TLS."""
    import ssl

    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    conf = good_config(tmp_path, listen=f"ssl:0:interface=127.0.0.1:privateKey={tmp_path / 'server.pem'}")
    out = tmp_path / "out.txt"
    with open(out, "wb") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "pop3shield", "run", "--config", str(conf)], stdout=handle,
                                stderr=subprocess.DEVNULL, env=_env(tmp_path), cwd=tmp_path)
    try:
        port = int(wait_for_line(out, r"listening on 127\.0\.0\.1:(\d+)", proc).group(1))
        context = ssl.create_default_context()
        ca.configure_trust(context)
        client = poplib.POP3_SSL("127.0.0.1", port, context=context, timeout=10)
        assert client.getwelcome() == b"+OK cli.test POP3 ready."
        client.user("alice")
        client.pass_("alice-pw")
        assert client.retr(1)[1] == [b"Subject: hi", b"", b"hello"]
        client.quit()
    finally:
        stop(proc)
