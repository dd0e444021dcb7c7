"""systemd: the units pass ``systemd-analyze verify``, the server serves a socket passed the way
systemd passes it (LISTEN_FDS, LISTEN_PID, fd 3), and READY=1 reaches $NOTIFY_SOCKET once every
listener is bound, and not at all when one cannot be."""

from __future__ import annotations

import os
import poplib
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.internet import defer

from pop3shield import sdnotify
from tests.support import require_binary
from tests.support.messages import write_maildir
from tests.support.pop3shield_server import REPO_ROOT, Pop3ShieldError, Pop3ShieldServer
from tests.support.raw import PASSWORD

UNITS = ("pop3shield.service", "pop3shield.socket", "pop3shield-activated.service")


# ----------------------------------------------------------------------------- the units


def _copy_units(target: Path) -> None:
    """The units with ExecStart pointing at an executable that exists here (this Python)."""
    for name in UNITS:
        text = (REPO_ROOT / "etc" / name).read_text(encoding="utf-8")
        (target / name).write_text(text.replace("/usr/local/bin/pop3shield", sys.executable), encoding="utf-8")


def _verify(directory: Path, names: tuple[str, ...]) -> subprocess.CompletedProcess:
    analyze = require_binary("systemd-analyze")
    return subprocess.run([analyze, "verify", "--man=no", *[f"./{name}" for name in names]], cwd=directory,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"})


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    _copy_units(tmp_path)
    result = _verify(tmp_path, UNITS)
    ours = [line for line in (result.stdout + result.stderr).splitlines()
            if any(name in line for name in UNITS)]
    assert result.returncode == 0 and ours == [], result.stdout + result.stderr


def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: the same command on a unit with a typo and a missing program."""
    _copy_units(tmp_path)
    path = tmp_path / "pop3shield.service"
    path.write_text(path.read_text().replace("ProtectSystem=strict", "ProtectSystm=strict")
                    .replace(sys.executable, "/nonexistent/pop3shield"))
    result = _verify(tmp_path, ("pop3shield.service",))
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "ProtectSystm" in output and "/nonexistent/pop3shield" in output


def _settings(name: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in (REPO_ROOT / "etc" / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_the_units_are_hardened_as_documented() -> None:
    plain, sock, activated = (_settings(name) for name in UNITS)
    for unit in (plain, activated):
        assert unit["Type"] == ["notify"]
        assert unit["NoNewPrivileges"] == ["yes"] and unit["ProtectSystem"] == ["strict"]
        assert unit["ReadWritePaths"] == ["/var/mail /var/log/pop3shield"]
        assert unit["User"] == ["vmail"] and "DynamicUser" not in unit
        assert unit["ExecStart"] == ["/usr/local/bin/pop3shield run --config /etc/pop3shield/pop3shield.toml"]
    assert activated["CapabilityBoundingSet"] == [""] and activated["AmbientCapabilities"] == [""]
    assert plain["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert sock["Service"] == ["pop3shield-activated.service"] and sock["Accept"] == ["no"]
    assert sock["ListenStream"] == ["0.0.0.0:110"]  # index 0, domain INET: what the config names


# ----------------------------------------------------------------------------- sd_notify


def _datagram_socket(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_notify_to_a_path_and_to_an_abstract_name(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with _datagram_socket(path) as sock:
        assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": path})
        assert sock.recv(4096) == b"READY=1"
    name = f"pop3shield-test-{os.getpid()}-{time.monotonic_ns()}"
    with _datagram_socket(b"\0" + name.encode()) as sock:
        assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"READY=1"


def test_notify_without_a_socket_does_nothing(tmp_path: Path) -> None:
    assert not sdnotify.notify("READY=1", {})
    assert not sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "relative/name"})
    assert not sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})  # logged, no raise


class _Listener:
    """What ReadyNotifier looks at on a ListenService: its Deferred and its port."""

    def __init__(self) -> None:
        self.listening: defer.Deferred = defer.Deferred()
        self.port = None

    def bound(self) -> None:
        self.port = object()
        self.listening.callback(self.port)

    def failed(self) -> None:
        self.listening.callback(None)  # ListenService._failed handles the error and returns None


def test_ready_only_once_every_listener_is_bound(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with _datagram_socket(path) as sock:
        sock.setblocking(False)
        first, second = _Listener(), _Listener()
        notifier = sdnotify.ReadyNotifier([first, second], {"NOTIFY_SOCKET": path})
        notifier.startService()
        first.bound()
        with pytest.raises(BlockingIOError):
            sock.recv(4096)
        second.bound()
        assert sock.recv(4096) == b"READY=1"
        notifier.stopService()
        assert sock.recv(4096) == b"STOPPING=1"
        failing = [_Listener(), _Listener()]
        notifier = sdnotify.ReadyNotifier(failing, {"NOTIFY_SOCKET": path})
        notifier.startService()
        failing[0].bound()
        failing[1].failed()
        with pytest.raises(BlockingIOError):
            sock.recv(4096)


# ----------------------------------------------------------------------------- real server

LAUNCHER = '''\
#!{python}
"""Start pop3shield the way systemd does: {what}."""  # noqa
import os, socket, sys
listen = {listen!r}
if listen:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    with open({port_file!r}, "w") as handle:
        handle.write(str(sock.getsockname()[1]))
    if sock.fileno() != 3:
        os.dup2(sock.fileno(), 3, inheritable=True)
        sock.close()
    else:
        os.set_inheritable(3, True)
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_PID"] = str(os.getpid())  # exec keeps the PID
    os.environ["LISTEN_FDNAMES"] = "pop3shield.socket"  # systemd >= 227: the socket unit's name by default
notify = {notify!r}
if notify:
    os.environ["NOTIFY_SOCKET"] = notify
os.execv({python!r}, [{python!r}, *sys.argv[1:]])
'''


def _launcher(tmp_path: Path, *, listen: bool, notify: str | None = None) -> Path:
    path = tmp_path / "launch-like-systemd"
    path.write_text(LAUNCHER.format(python=sys.executable, listen=listen, notify=notify,
                                    port_file=str(tmp_path / "port"),
                                    what="a socket on fd 3" if listen else "a notify socket"))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _server(tmp_path: Path, launcher: Path, listen: str) -> tuple[Pop3ShieldServer, Path]:
    root = tmp_path / "mail"
    write_maildir(root / "alice" / "Maildir")
    return Pop3ShieldServer(python=str(launcher), listen=listen), root


def test_serves_a_socket_passed_with_listen_fds(tmp_path: Path) -> None:
    server, root = _server(tmp_path, _launcher(tmp_path, listen=True), "systemd:domain=INET:index=0")
    server.start(tmp_path / "run", {"alice": PASSWORD}, root)
    try:
        passed = int((tmp_path / "port").read_text())
        assert server.port == passed  # the socket on fd 3, not one of its own
        client = poplib.POP3(server.host, passed, timeout=10)
        assert client.getwelcome().startswith(b"+OK")
        client.user("alice")
        assert client.pass_(PASSWORD).startswith(b"+OK")
        count, size = client.stat()
        assert count == 9 and size > 0
        assert client.retr(1)[0].startswith(b"+OK")
        assert client.quit().startswith(b"+OK")
        assert "systemd:domain=INET:index=0" in server.log_path.read_text()
    finally:
        server.stop()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ready_reaches_notify_socket_once_the_port_accepts(tmp_path: Path) -> None:
    notify_path = str(tmp_path / "notify.sock")
    with _datagram_socket(notify_path) as sock:
        port = _free_port()
        server, root = _server(tmp_path, _launcher(tmp_path, listen=False, notify=notify_path),
                               f"tcp:{port}:interface=127.0.0.1")
        server.startup_timeout = 30
        try:
            server.start(tmp_path / "run", {"alice": PASSWORD}, root)
            message = sock.recv(4096)
            assert message == b"READY=1"
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                assert conn.recv(512).startswith(b"+OK")
            # the datagram was sent after the listening line, so after bind and listen
            assert re.search(rb"listening on 127\.0\.0\.1:%d" % port, server.stdout_path.read_bytes())
            sock.settimeout(0.5)
            with pytest.raises(socket.timeout):
                sock.recv(4096)  # once
        finally:
            server.stop()
        sock.settimeout(5)
        assert sock.recv(4096) == b"STOPPING=1"


def test_no_ready_when_a_listener_cannot_bind(tmp_path: Path) -> None:
    notify_path = str(tmp_path / "notify.sock")
    with _datagram_socket(notify_path) as sock, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        server, root = _server(tmp_path, _launcher(tmp_path, listen=False, notify=notify_path),
                               f"tcp:{port}:interface=127.0.0.1")
        with pytest.raises(Pop3ShieldError):
            server.start(tmp_path / "run", {"alice": PASSWORD}, root)
        server.stop()
        assert f"cannot listen on 'tcp:{port}:interface=127.0.0.1'" in server.stderr_path.read_text()
        sock.settimeout(0.5)
        messages = []
        try:
            while True:
                messages.append(sock.recv(4096))
        except socket.timeout:
            pass
        assert b"READY=1" not in messages


def test_a_systemd_listener_without_a_passed_socket_stops_start_up_with_one_line(tmp_path: Path) -> None:
    server, root = _server(tmp_path, Path(sys.executable), "systemd:domain=INET:index=0")
    with pytest.raises(Pop3ShieldError):
        server.start(tmp_path / "run", {"alice": PASSWORD}, root)
    server.stop()
    assert server.returncode == 1
    assert server.stderr_path.read_text() == (
        "pop3shield: cannot listen on 'systemd:domain=INET:index=0': "
        "systemd passed no such socket (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES)\n")
    assert "Traceback" not in server.log_path.read_text()
