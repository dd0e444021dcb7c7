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

import bcrypt
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


def start_twistd(conf: Path, log: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """``twistd -n pop3shield --config CONF`` logging to ``log``; the process and its port."""
    proc = subprocess.Popen(["twistd", "-n", "--pidfile", "", "--logfile", str(log), "pop3shield", "--config",
                             str(conf)], env=env, cwd=conf.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return proc, int(wait_for_line(log, r"listening on 127\.0\.0\.1:(\d+)", proc).group(1))
    except BaseException:
        stop(proc)
        raise


@pytest.mark.skipif(not _plugin_installed() and not IN_CI, reason="needs `pip install .` (the plugin file lives in "
                    "site-packages/twisted/plugins)")
def test_twistd_lists_and_runs_the_plugin(tmp_path: Path) -> None:
    env = _env(tmp_path)
    env.pop("PYTHONPATH")  # the installed package, as an operator would run it
    helptext = subprocess.run(["twistd", "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert re.search(r"^\s+pop3shield\s+pop3shield: a hardened POP3", helptext.stdout, re.M), helptext.stdout
    conf = good_config(tmp_path)
    log = tmp_path / "twistd.log"
    proc, port = start_twistd(conf, log, env)
    try:
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


@pytest.mark.skipif(not _plugin_installed() and not IN_CI, reason="needs `pip install .` (the plugin file lives in "
                    "site-packages/twisted/plugins)")
def test_twistd_log_lines_are_escaped_too(tmp_path: Path) -> None:
    """Under twistd its own observer writes the log: a message file name with ESC and a newline
    (maildir.py's "cannot delete" warning names it) must still be one escaped line there."""
    env = _env(tmp_path)
    env.pop("PYTHONPATH")
    conf = good_config(tmp_path)
    new = tmp_path / "mail" / "alice" / "Maildir" / "new"
    for old in new.iterdir():
        old.unlink()
    message = new / "1700000001.M2P2.\x1b[31mred\nFORGED line"
    message.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    log = tmp_path / "twistd.log"
    proc, port = start_twistd(conf, log, env)
    try:
        client = poplib.POP3("127.0.0.1", port, timeout=10)
        client.user("alice")
        client.pass_("alice-pw")
        client.dele(1)
        message.unlink()
        message.mkdir()  # unlink now fails (EISDIR): the warning names the file
        with pytest.raises(poplib.error_proto):
            client.quit()
        client.close()
        wait_for_line(log, "cannot delete", proc)
    finally:
        stop(proc)
    raw = log.read_bytes()
    assert b"\x1b" not in raw
    lines = raw.decode("utf-8").split("\n")
    assert not any(line.startswith("FORGED") for line in lines)
    [line] = [line for line in lines if "cannot delete" in line]
    assert r"cannot delete new/1700000001.M2P2.\x1b[31mred\nFORGED line in " in line, line


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


# --------------------------------------------------------------------------- preflight: check-config and run agree


def _one_error_line(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [expected]


@pytest.mark.parametrize("command", [("check-config",), ("run", "--config")])
@pytest.mark.parametrize("section", ["logging", "events"])
def test_a_log_or_event_file_in_a_missing_directory_stops_both_commands(
        tmp_path: Path, command: tuple[str, ...], section: str) -> None:
    conf = good_config(tmp_path)
    missing = tmp_path / "no-such-dir" / f"{section}.out"
    body = conf.read_text().replace('[events]\npath = "events.jsonl"\n', "")
    conf.write_text(body + f'[{section}]\npath = "{missing}"\n')
    result = run_cli(tmp_path, *command, str(conf))
    _one_error_line(result, f"pop3shield: {conf}: {section}.path: cannot open {missing} for appending: "
                            f"No such file or directory")


@pytest.mark.parametrize("command", [("check-config",), ("run", "--config")])
def test_a_missing_maildir_base_stops_both_commands(tmp_path: Path, command: tuple[str, ...]) -> None:
    conf = good_config(tmp_path)
    conf.write_text(conf.read_text().replace('maildir = "mail/{user}/Maildir"', 'maildir = "gone/u-{user}/Maildir"'))
    result = run_cli(tmp_path, *command, str(conf))
    _one_error_line(result, f"pop3shield: {conf}: backend.maildir: {tmp_path / 'gone'} does not exist "
                            f"(the fixed part of '{tmp_path}/gone/u-{{user}}/Maildir')")


def test_check_config_opens_and_creates_the_files_run_opens(tmp_path: Path) -> None:
    conf = good_config(tmp_path)
    conf.write_text(conf.read_text() + '[logging]\npath = "server.log"\n')
    result = run_cli(tmp_path, "check-config", str(conf))
    assert (result.returncode, result.stderr) == (0, "")
    for name in ("server.log", "events.jsonl"):
        assert oct((tmp_path / name).stat().st_mode & 0o777) == "0o640"


def test_check_config_warns_one_line_each_on_what_is_legal_but_dangerous(tmp_path: Path) -> None:
    conf = good_config(tmp_path)
    passwd = tmp_path / "users.passwd"
    with passwd.open("a") as handle:
        handle.write("bob:{PLAIN}bob-pw\n")
    passwd.chmod(0o644)
    listen = ["tcp:110", "tcp:110:interface=0.0.0.0", "tcp6:110:interface=\\\\:\\\\:", "ssl:995:privateKey=k.pem",
              "haproxy:tcp:110", "tcp:110:interface=127.0.0.1", "tcp6:110:interface=\\\\:\\\\:1", "unix:/tmp/p.sock"]
    body = conf.read_text().replace('listen = ["tcp:0:interface=127.0.0.1"]',
                                    "listen = [" + ", ".join(f'"{item}"' for item in listen) + "]")
    body = body.replace("[auth]\n", "[auth]\nallow_plaintext = true\n")
    body = body.replace('path = "events.jsonl"', 'path = "users.passwd"')
    conf.write_text(body)
    result = run_cli(tmp_path, "check-config", str(conf))
    assert result.returncode == 0, result.stderr
    everywhere = "listens on every interface (give interface= the address clients should reach)"
    assert result.stderr.splitlines() == [
        f"pop3shield: warning: {conf}: auth.passwd_file: {passwd} is readable by other users (mode 0644; chmod o-rw)",
        f"pop3shield: warning: {conf}: auth.allow_plaintext: {passwd} has 1 {{PLAIN}} entry: a stolen copy is a "
        f"list of working passwords",
        f"pop3shield: warning: {conf}: server.listen[0]: 'tcp:110' {everywhere}",
        f"pop3shield: warning: {conf}: server.listen[1]: 'tcp:110:interface=0.0.0.0' {everywhere}",
        f"pop3shield: warning: {conf}: server.listen[2]: 'tcp6:110:interface=\\\\:\\\\:' {everywhere}",
        f"pop3shield: warning: {conf}: server.listen[3]: 'ssl:995:privateKey=k.pem' {everywhere}",
        f"pop3shield: warning: {conf}: server.listen[4]: 'haproxy:tcp:110' {everywhere}",
        f"pop3shield: warning: {conf}: events.path: {passwd} is also auth.passwd_file",
    ]
    assert result.stdout.splitlines()[-1] == f"{conf}: OK"


def test_run_logs_the_preflight_warnings_at_start_up(tmp_path: Path) -> None:
    conf = good_config(tmp_path)
    (tmp_path / "users.passwd").chmod(0o666)
    conf.write_text(conf.read_text().replace('path = "events.jsonl"', 'path = "server.log"')
                    + '[logging]\npath = "server.log"\n')
    out = tmp_path / "out.txt"
    with open(out, "wb") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "pop3shield", "run", "--config", str(conf)], stdout=handle,
                                stderr=subprocess.STDOUT, env=_env(tmp_path), cwd=tmp_path)
    try:
        wait_for_line(out, r"listening on 127\.0\.0\.1:(\d+)", proc)
        log = tmp_path / "server.log"
        wait_for_line(log, r"listening on", proc)
    finally:
        stop(proc)
    warnings = [line.split("] ", 1)[1] for line in log.read_text().splitlines() if "#warn] config warning:" in line]
    assert warnings == [
        f"config warning: {conf}: auth.passwd_file: {tmp_path / 'users.passwd'} is readable and writable by other "
        f"users (mode 0666; chmod o-rw)",
        f"config warning: {conf}: events.path: {tmp_path / 'server.log'} is also logging.path",
    ]


@pytest.mark.parametrize(("description", "everywhere"), [
    ("tcp:110", True), ("tcp:port=110", True), ("tcp:110:interface=0.0.0.0", True), ("tcp:110:0.0.0.0", True),
    ("tcp:110:interface=\\:\\:", True), ("tcp6:110", True), ("tcp6:110:50:\\:\\:", True), ("ssl:995", True),
    ("haproxy:tcp:110", True), ("tcp:110:interface=127.0.0.1", False), ("tcp:110:192.0.2.1", False),
    ("tcp6:110:interface=\\:\\:1", False), ("ssl:995:interface=192.0.2.1:privateKey=k.pem", False),
    ("haproxy:tcp:110:interface=127.0.0.1", False), ("unix:/run/pop3.sock", False),
    ("systemd:domain=INET:index=0", False),
])
def test_which_listeners_are_on_every_interface(description: str, everywhere: bool) -> None:
    from pop3shield.service import _listens_everywhere

    assert _listens_everywhere(description) is everywhere


def _worktree_plugin():
    """This checkout's twistd plugin module (the twistd test above runs the installed one)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pop3shield_plugin_under_test",
                                                  REPO / "twisted" / "plugins" / "pop3shield_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_twistd_plugin_runs_the_same_preflight(tmp_path: Path) -> None:
    import logging

    from twisted.logger import globalLogPublisher
    from twisted.python import usage

    from pop3shield.logsetup import FieldEscaper, TwistedLoggerHandler

    plugin = _worktree_plugin()
    conf = good_config(tmp_path)
    missing = tmp_path / "no-such-dir" / "events.jsonl"
    conf.write_text(conf.read_text().replace('path = "events.jsonl"', f'path = "{missing}"'))
    with pytest.raises(usage.UsageError) as refused:
        plugin.Options().parseOptions(["--config", str(conf)])
    assert str(refused.value) == (f"{conf}: events.path: cannot open {missing} for appending: "
                                  f"No such file or directory")

    conf.write_text(conf.read_text().replace(f'path = "{missing}"', 'path = "events.jsonl"'))
    (tmp_path / "users.passwd").chmod(0o604)
    options = plugin.Options()
    options.parseOptions(["--config", str(conf)])
    seen: list[dict] = []
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    globalLogPublisher.addObserver(seen.append)
    try:
        top = plugin.serviceMaker.makeService(options)
        assert [h for h in root.handlers if isinstance(h, TwistedLoggerHandler)]
        logging.getLogger("pop3shield.maildir").warning("bridged %s", "x\x1b")
    finally:
        globalLogPublisher.removeObserver(seen.append)
        for observer in [o for o in globalLogPublisher._observers if isinstance(o, FieldEscaper)]:
            globalLogPublisher.removeObserver(observer)  # it escapes in place: not for the other tests
        root.handlers[:] = handlers
        root.setLevel(level)
    top.factory.events.close()
    assert [e["warning"] for e in seen if e.get("log_format") == "config warning: {warning}"] == [
        f"{conf}: auth.passwd_file: {tmp_path / 'users.passwd'} is readable by other users (mode 0604; chmod o-rw)"]
    # the escaper changes the event in place: every observer holds the same, escaped, dictionary
    assert [e["args"] for e in seen if e.get("log_namespace") == "pop3shield.maildir"] == [("x\\x1b",)]


# --------------------------------------------------------------------------- passwd --file


def _stat_of(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_uid, st.st_gid, st.st_mode & 0o7777


def _store(home: Path, target: Path, user: str = "alice", password: str = "n3w-pass",
           *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli(home, "passwd", user, "--scheme", "BLF-CRYPT", "--file", str(target), "--stdin", *extra,
                   stdin=password + "\n")


def _only_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another owner needs root")
def test_passwd_file_keeps_owner_group_and_mode(tmp_path: Path) -> None:
    passwd = tmp_path / "users.passwd"
    passwd.write_text("bob:{PLAIN}x\n")
    os.chown(passwd, 4321, 8765)  # e.g. root:nogroup 0640 under User=vmail, Group=nogroup
    os.chmod(passwd, 0o640)
    result = _store(tmp_path, passwd)
    assert result.returncode == 0, result.stderr
    assert _stat_of(passwd) == (4321, 8765, 0o640)
    assert verify_password(load_passwd(passwd, allow_plaintext=True)["alice"], b"n3w-pass")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.passwd"]  # no temporary left


def test_passwd_new_file_is_private(tmp_path: Path) -> None:
    passwd = tmp_path / "new.passwd"
    result = _store(tmp_path, passwd)
    assert result.returncode == 0, result.stderr
    assert _stat_of(passwd)[2] == 0o600
    assert passwd.read_bytes().count(b"\n") == 1


def test_passwd_writes_through_a_symlink_and_keeps_it(tmp_path: Path) -> None:
    real_dir, link_dir = tmp_path / "real", tmp_path / "etc"
    real_dir.mkdir()
    link_dir.mkdir()
    real = real_dir / "users.passwd"
    real.write_text("bob:{PLAIN}x\n")
    os.chmod(real, 0o640)
    link = link_dir / "users.passwd"
    link.symlink_to(Path("..") / "real" / "users.passwd")
    inode = os.stat(real).st_ino
    result = _store(tmp_path, link)
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and os.readlink(link) == "../real/users.passwd"
    assert os.stat(real).st_ino != inode  # replaced by rename, not rewritten in place
    assert _stat_of(real)[2] == 0o640
    assert verify_password(load_passwd(link, allow_plaintext=True)["alice"], b"n3w-pass")
    assert sorted(p.name for p in real_dir.iterdir()) == ["users.passwd"]
    assert sorted(p.name for p in link_dir.iterdir()) == ["users.passwd"]


def test_passwd_keeps_other_lines_byte_for_byte_and_the_users_extra_fields(tmp_path: Path) -> None:
    passwd = tmp_path / "users.passwd"
    before = [
        b"# pop3shield users \xe2\x80\x94 comments stay\n",
        b"bob:{PLAIN}plain-pw\r\n",  # needs allow_plaintext, and is none of this command's business
        b"carol:{SHA512-CRYPT}$6$not-supported-here\n",
        b"\n",
        b"alice:{PLAIN}old:1000:1000::/home/alice::nologin allow_nets=10.0.0.0/8\r\n",
        b"dave:{PLAIN}x::::::quota=1\n",
        b"\xff not utf-8 at all",
    ]
    passwd.write_bytes(b"".join(before))
    result = _store(tmp_path, passwd)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{passwd}: entry for alice written\n"
    after = passwd.read_bytes().split(b"\n")
    after = [line + b"\n" for line in after[:-1]] + ([after[-1]] if after[-1] else [])
    assert after[:4] == before[:4] and after[5:] == before[5:]
    user, hashed, rest = after[4].split(b":", 2)
    assert user == b"alice" and hashed.startswith(b"{BLF-CRYPT}$2b$")
    assert rest == b"1000:1000::/home/alice::nologin allow_nets=10.0.0.0/8\r\n"  # still disabled
    assert bcrypt.checkpw(b"n3w-pass", hashed[len(b"{BLF-CRYPT}"):])


def test_passwd_appends_a_new_user_after_a_last_line_without_newline(tmp_path: Path) -> None:
    passwd = tmp_path / "users.passwd"
    passwd.write_bytes(b"bob:{PLAIN}x")
    result = _store(tmp_path, passwd, "erin")
    assert result.returncode == 0, result.stderr
    first, second, end = passwd.read_bytes().split(b"\n")
    assert (first, end) == (b"bob:{PLAIN}x", b"")
    assert second.startswith(b"erin:{BLF-CRYPT}$2b$")


@pytest.mark.parametrize(("user", "problem"), [
    ("a:b", "user name contains ':'"),
    ("a\nb", "whitespace or control characters"),
    ("a\rb", "whitespace or control characters"),
    ("", "empty user name"),
    ("a b", "whitespace or control characters"),
    ("a/b", "the server would refuse it"),
    (".hidden", "the server would refuse it"),
    ("%s%n", "the server would refuse it"),
])
def test_passwd_refuses_bad_user_names_before_asking_in_one_line(tmp_path: Path, user: str, problem: str) -> None:
    passwd = tmp_path / "users.passwd"
    passwd.write_bytes(b"bob:{PLAIN}x\n")
    for args in ((), ("--file", str(passwd))):
        result = run_cli(tmp_path, "passwd", user, "--stdin", *args, stdin="pw\n")
        assert result.returncode == 2
        line = _only_line(result)
        assert line.startswith("pop3shield: user name '") and problem in line
        assert result.stdout == ""
    assert passwd.read_bytes() == b"bob:{PLAIN}x\n"


def test_passwd_username_chars_follow_the_option(tmp_path: Path) -> None:
    assert _store(tmp_path, tmp_path / "u.passwd", "a%b").returncode == 2
    result = _store(tmp_path, tmp_path / "u.passwd", "a%b", "pw", "--username-chars", "%")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "u.passwd").read_text().startswith("a%b:{BLF-CRYPT}")


def test_passwd_names_only_the_problem_of_the_line_it_writes(tmp_path: Path) -> None:
    passwd = tmp_path / "users.passwd"
    original = b"bob:{PLAIN}x\nalice:{PLAIN}old::::::nopassword\ncarol:{PLAIN}y\n"
    passwd.write_bytes(original)
    result = _store(tmp_path, passwd)
    assert result.returncode == 2
    assert _only_line(result) == (f"pop3shield: {passwd}:2: extra field 'nopassword' is not supported: "
                                  f"it would accept any password")
    assert passwd.read_bytes() == original
    passwd.write_bytes(b"alice:{PLAIN}a\nbob:{PLAIN}x\nalice:{PLAIN}b\n")
    result = _store(tmp_path, passwd)
    assert _only_line(result) == f"pop3shield: {passwd}:3: user 'alice' appears again (first on line 1)"


def test_passwd_reports_unwritable_places_and_long_bcrypt_passwords_in_one_line(tmp_path: Path) -> None:
    result = _store(tmp_path, tmp_path / "missing-dir" / "users.passwd")
    assert result.returncode == 2
    assert _only_line(result).startswith(f"pop3shield: {tmp_path / 'missing-dir' / 'users.passwd'}: cannot write in ")
    result = _store(tmp_path, tmp_path / "users.passwd", "alice", "x" * 73)
    assert result.returncode == 2
    assert _only_line(result) == "pop3shield: bcrypt ignores bytes past 72; use ARGON2ID for longer passwords"
    assert "xxxx" not in result.stderr
    directory = tmp_path / "adir"
    directory.mkdir()
    assert _only_line(_store(tmp_path, directory)) == f"pop3shield: {directory}: cannot read: Is a directory"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert _only_line(_store(tmp_path, fifo)) == f"pop3shield: {fifo}: not a regular file"


def test_passwd_stores_the_nfc_name_and_replaces_a_decomposed_line(tmp_path: Path) -> None:
    """The server compares user names in NFC: the command writes that form, and a line stored
    decomposed is that user's line, replaced rather than duplicated."""
    passwd = tmp_path / "users.passwd"
    passwd.write_bytes("mu\u0308ller:{PLAIN}old\nbob:{PLAIN}x\n".encode("utf-8"))
    result = _store(tmp_path, passwd, "mu\u0308ller")
    assert result.returncode == 0, result.stderr
    lines = passwd.read_bytes().split(b"\n")
    assert lines[0].split(b":")[0] == "m\u00fcller".encode("utf-8")
    assert lines[1:] == [b"bob:{PLAIN}x", b""]
