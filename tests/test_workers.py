"""``server.workers = 2`` over real sockets: one supervisor, two workers on the same listening socket.

Which worker holds a connection is read from /proc: the server side of a client's TCP connection
is the socket whose remote port is the client's local port, and the worker that has that socket
among its descriptors is the one serving it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import sys
import time
from pathlib import Path

import pytest

from tests.support.messages import write_maildir
from tests.support.pop3shield_server import Pop3ShieldServer

PASSWORD = "workers-password-1"
USERS = {"alice": PASSWORD, "bob": "bob-password-2"}

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def children(pid: int) -> set[int]:
    found = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            found |= {int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split()}
        except OSError:
            pass
    return found


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def _server_inode(client: socket.socket) -> int | None:
    """The inode of the server's end of this loopback connection (from /proc/net/tcp)."""
    local_port = client.getsockname()[1]
    server_port = client.getpeername()[1]
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], int(fields[9])
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == local_port:
            return inode
    return None


def owner(client: socket.socket, workers: set[int]) -> int | None:
    """The worker PID serving this connection."""
    inode = _server_inode(client)
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in workers:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    return None


def greeted(host: str, port: int) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection((host, port), timeout=15)
    return sock, read_line(sock)


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(512)
        if not chunk:
            break
        data += chunk
    return data


def command(sock: socket.socket, line: bytes) -> bytes:
    sock.sendall(line + b"\r\n")
    return read_line(sock)


@pytest.fixture
def start(tmp_path: Path):
    started: list[Pop3ShieldServer] = []

    def run(server_toml: str = "", **kwargs) -> Pop3ShieldServer:
        root = tmp_path / "mail"
        for user in USERS:
            write_maildir(root / user / "Maildir")
        server = Pop3ShieldServer(server_toml="workers = 2\n" + server_toml, startup_timeout=60, **kwargs)
        started.append(server)
        server.start(tmp_path / "run", USERS, root)
        wait_for(lambda: len(children(server.proc.pid)) == 2, 30, "two workers")
        return server

    yield run
    for server in started:
        server.stop()


def spread(server: Pop3ShieldServer, count: int) -> list[tuple[socket.socket, int]]:
    """``count`` greeted connections that both workers serve.

    Both workers wait on the one listening socket and the first to wake takes the connection, so
    a client that connects one at a time can see one worker win every race. When the first half
    all went to one worker, that worker (a process this test started) is stopped for the rest,
    which the other must then accept, and continued afterwards.
    """
    workers = children(server.proc.pid)
    held: list[tuple[socket.socket, int]] = []
    stopped = None
    try:
        for n in range(count):
            owners = {pid for _, pid in held}
            if n == count - count // 2 and len(owners) == 1:
                stopped = owners.pop()
                os.kill(stopped, signal.SIGSTOP)
            sock, greeting = greeted(server.host, server.port)
            assert greeting.startswith(b"+OK"), greeting
            held.append((sock, wait_for(lambda: owner(sock, workers), 10, "the connection's worker")))
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
    assert {pid for _, pid in held} == workers, (held, workers)
    return held


def test_both_workers_serve_logins(start) -> None:
    server = start("max_connections_per_ip = 100", extra_toml='[metrics]\nlisten = "tcp:0:interface=127.0.0.1"')
    held = spread(server, 8)
    try:
        for index, (sock, _) in enumerate(held):  # one user per session (a mailbox is locked per session)
            user, password = ("alice", PASSWORD) if index % 2 else ("bob", USERS["bob"])
            assert command(sock, f"USER {user}".encode()).startswith(b"+OK")
            assert command(sock, f"PASS {password}".encode()).startswith(b"+OK Logged in")
            assert command(sock, b"STAT").startswith(b"+OK ")
            assert command(sock, b"QUIT").startswith(b"+OK")
    finally:
        for sock, _ in held:
            sock.close()
    log = server.log_path.read_text()
    assert re.search(r"listening on 127\.0\.0\.1:\d+ \(tcp:0:interface=127\.0\.0\.1\) with 2 workers", log)
    # the supervisor's metrics endpoint has each worker's series under its own label
    address = wait_for(lambda: re.search(r"metrics on http://([\d.]+:\d+)/metrics", log), 5, "the metrics line")
    import urllib.request

    page = urllib.request.urlopen(f"http://{address.group(1)}/metrics", timeout=10).read().decode()
    accepted = {m.group(1): float(m.group(2)) for m in
                re.finditer(r'pop3shield_connections_total\{result="accepted",worker="(\d)"\} (\S+)', page)}
    assert set(accepted) == {"0", "1"} and all(value >= 1 for value in accepted.values()), page[:2000]
    assert "pop3shield_workers 2.0" in page


def test_a_killed_worker_is_restarted_and_service_goes_on(start) -> None:
    server = start()
    before = children(server.proc.pid)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    after = wait_for(lambda: (lambda now: now if len(now) == 2 and victim not in now else None)(
        children(server.proc.pid)), 30, "a new worker")
    assert len(after & before) == 1
    log = wait_for(lambda: re.search(rf"worker \d \(pid {victim}\) ended \(signal 9\) after [\d.]+ s; "
                                     rf"restarting in [\d.]+ s", server.log_path.read_text()), 10, "the log line")
    assert log
    new = (after - before).pop()
    wait_for(lambda: re.search(rf"\(pid {new}\)", server.log_path.read_text()), 10, "the new worker's start")
    # service goes on, and the new worker takes connections too
    held = spread(server, 6)
    try:
        assert new in {pid for _, pid in held}
        sock = held[0][0]
        assert command(sock, b"USER bob").startswith(b"+OK")
        assert command(sock, b"PASS bob-password-2").startswith(b"+OK Logged in")
    finally:
        for sock, _ in held:
            sock.close()


def test_per_address_limit_holds_across_workers(start) -> None:
    server = start("max_connections_per_ip = 6")
    held = spread(server, 6)  # six from 127.0.0.1, on both workers
    try:
        for _ in range(3):  # whichever worker takes it, it knows the other's
            sock, line = greeted(server.host, server.port)
            with sock:
                assert line == b"-ERR [SYS/TEMP] Too many connections from your address.\r\n"
        held.pop()[0].close()  # one place back: the next one is admitted
        sock, line = wait_for(lambda: (lambda s, l: (s, l) if l.startswith(b"+OK") else s.close())(
            *greeted(server.host, server.port)), 10, "a place freed by a closed connection")
        sock.close()
    finally:
        for sock, _ in held:
            sock.close()


def test_new_connection_rate_holds_across_workers(start) -> None:
    # one bucket of 10 per address, refilled at one token a minute, shared by both workers (each
    # with a bucket of its own, 20 would get in); the start-up probe may have taken a token or two.
    # Only a run in which both workers accepted some proves the sharing: when the kernel handed
    # every connection to one worker, the same is tried from another address (another bucket).
    server = start("new_connections_per_ip = 0.0166\nnew_connections_burst = 10")
    workers = children(server.proc.pid)
    for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"):
        admitted: list[tuple[socket.socket, int]] = []
        try:
            for _ in range(25):
                sock = socket.create_connection((server.host, server.port), timeout=15, source_address=(source, 0))
                line = read_line(sock)
                if not line.startswith(b"+OK"):
                    sock.close()
                    assert line == b"-ERR [SYS/TEMP] Too many new connections from your address, try again later.\r\n"
                    break
                admitted.append((sock, wait_for(lambda: owner(sock, workers), 10, "the connection's worker")))
            else:
                raise AssertionError("25 new connections in a row were admitted")
            assert 8 <= len(admitted) <= 10 if source == "127.0.0.1" else len(admitted) == 10
            if {pid for _, pid in admitted} == workers:
                return  # both workers drew from the one bucket
        finally:
            for sock, _ in admitted:
                sock.close()
    raise AssertionError("six addresses' connections never reached both workers")


def test_a_dead_workers_connections_stop_counting(start) -> None:
    server = start("max_connections_per_ip = 4")
    held = spread(server, 4)
    victim = held[0][1]
    os.kill(victim, signal.SIGKILL)
    for sock, pid in held:
        if pid == victim:
            sock.close()
    # the supervisor released the dead worker's places: new connections are admitted again
    sock, line = wait_for(lambda: (lambda s, l: (s, l) if l.startswith(b"+OK") else s.close())(
        *greeted(server.host, server.port)), 30, "the dead worker's places released")
    sock.close()
    for sock, _ in held:
        sock.close()


def test_brute_force_penalty_holds_across_workers(start) -> None:
    server = start("auth_failure_delay = 0.5\nauth_failure_delay_max = 8")
    held = spread(server, 4)
    try:
        by_worker: dict[int, socket.socket] = {}
        for sock, pid in held:
            by_worker.setdefault(pid, sock)
        first, second = by_worker.values()

        def fail(sock: socket.socket) -> float:
            assert command(sock, b"USER alice").startswith(b"+OK")
            started = time.monotonic()
            assert command(sock, b"PASS wrong-password") == b"-ERR [AUTH] Authentication failed.\r\n"
            return time.monotonic() - started

        fail(first)  # level 1 on one worker: 0.5 s
        # the other worker's first failure already meets level 2 (1 s), its second level 3 (2 s);
        # unshared counts would answer after 0.5 s and 1 s
        assert fail(second) >= 0.9
        assert fail(second) >= 1.8
    finally:
        for sock, _ in held:
            sock.close()


def test_sigterm_stops_the_supervisor_and_every_worker(start) -> None:
    server = start()
    workers = children(server.proc.pid)
    sock, line = greeted(server.host, server.port)
    assert line.startswith(b"+OK")
    proc = server.proc
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0  # not the fixture's SIGKILL: every worker stopped in time
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}") or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    # the worker's grace (server.shutdown_grace) ran out: the session is told, then closed, no UPDATE
    sock.settimeout(10)
    told = b""
    while not told.endswith(b"\r\n"):
        chunk = sock.recv(512)
        assert chunk, told
        told += chunk
    assert told == b"-ERR [SYS/TEMP] Server shutting down.\r\n"
    assert sock.recv(512) == b""
    sock.close()
    server.stop()


def test_sighup_reaches_every_worker(start) -> None:
    server = start()
    os.kill(server.proc.pid, signal.SIGHUP)
    wait_for(lambda: server.log_path.read_text().count("SIGHUP: log and event files reopened") == 2, 20,
             "both workers reopening their files")
    sock, line = greeted(server.host, server.port)
    sock.close()
    assert line.startswith(b"+OK")


def test_a_killed_supervisor_leaves_no_worker_behind(start) -> None:
    server = start()
    workers = children(server.proc.pid)
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=10)

    def gone() -> bool:
        return all(not os.path.exists(f"/proc/{pid}") or
                   Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z" for pid in workers)
    wait_for(gone, 20, "the workers to end with their supervisor")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_burst_of_connections_waits_in_the_backlog(tmp_path: Path, workers: int) -> None:
    """With the server stopped, 300 connections complete their handshake in the kernel's accept queue
    (backlog 1024, not Twisted's 50, past which SYNs are dropped and a client waits a second or more)."""
    import select

    root = tmp_path / "mail"
    write_maildir(root / "alice" / "Maildir")
    server = Pop3ShieldServer(server_toml="max_connections_per_ip = 400", workers=workers, startup_timeout=60)
    server.start(tmp_path / "run", USERS, root)
    pids = [server.proc.pid, *children(server.proc.pid)]
    socks: list[socket.socket] = []
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        for _ in range(300):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex((server.host, server.port))
            socks.append(sock)
        pending = list(socks)
        deadline = time.monotonic() + 0.9  # below the first SYN retransmission (1 s)
        while pending and time.monotonic() < deadline:
            _, writable, _ = select.select([], pending, [], 0.1)
            pending = [sock for sock in pending if sock not in writable]
        assert not pending, f"{len(pending)} of 300 connections not established while the server was stopped"
        assert all(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 for sock in socks)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    try:
        for sock in socks:
            sock.setblocking(True)
            sock.settimeout(30)
            assert read_line(sock).startswith(b"+OK")
    finally:
        for sock in socks:
            sock.close()
        server.stop()


LAUNCHER = '''#!{python}
import os, sys
os.environ["NOTIFY_SOCKET"] = {notify!r}
os.execv({python!r}, [{python!r}, *sys.argv[1:]])
'''


def test_ready_once_when_both_workers_listen(tmp_path: Path, start) -> None:
    notify = str(tmp_path / "notify.sock")
    launcher = tmp_path / "launch"
    launcher.write_text(LAUNCHER.format(python=sys.executable, notify=notify))
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(notify)
        listener.settimeout(60)
        server = start(python=str(launcher))
        assert listener.recv(4096) == b"READY=1"
        # sent once both workers had their listeners: the supervisor said so first
        assert re.search(r"listening on 127\.0\.0\.1:\d+ \(.*\) with 2 workers", server.log_path.read_text())
        listener.settimeout(0.5)
        with pytest.raises(socket.timeout):
            listener.recv(4096)
        server.stop()
        listener.settimeout(10)
        assert listener.recv(4096) == b"STOPPING=1"


@pytest.mark.skipif(__import__("shutil").which("twistd") is None, reason="needs twistd")
def test_twistd_runs_one_process_and_says_so(tmp_path: Path) -> None:
    """The plugin of this checkout (PYTHONPATH): twistd daemonizes one process, so workers is ignored."""
    import subprocess

    from tests.support.pop3shield_server import REPO_ROOT

    maildir = tmp_path / "mail" / "alice" / "Maildir"
    write_maildir(maildir)
    passwd = tmp_path / "users.passwd"
    passwd.write_text(f"alice:{{PLAIN}}{PASSWORD}\n")
    passwd.chmod(0o600)
    conf = tmp_path / "pop3shield.toml"
    conf.write_text(f'[server]\nlisten = ["tcp:0:interface=127.0.0.1"]\nworkers = 2\n'
                    f'[auth]\npasswd_file = "{passwd}"\nallow_plaintext = true\n'
                    f'[backend]\nmaildir = "{tmp_path}/mail/{{user}}/Maildir"\n')
    log = tmp_path / "twistd.log"
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=str(REPO_ROOT), HOME=str(tmp_path))
    proc = subprocess.Popen(["twistd", "-n", "--pidfile", "", "--logfile", str(log), "pop3shield", "--config",
                             str(conf)], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port = int(wait_for(lambda: re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text())
                            if log.exists() else None, 60, "twistd's listening line").group(1))
        assert "twistd runs one process: server.workers = 2 is ignored (pop3shield run starts workers)" in \
            log.read_text()
        sock, line = greeted("127.0.0.1", port)
        with sock:
            assert line.startswith(b"+OK")
            assert command(sock, b"USER alice").startswith(b"+OK")
            assert command(sock, f"PASS {PASSWORD}".encode()).startswith(b"+OK Logged in")
        assert children(proc.pid) == set()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_known_pairs_and_failure_counts_are_shared_through_the_supervisor() -> None:
    """A login on one worker puts that pair's next login first in every worker's hashing queue (hashpool)."""
    from twisted.internet.task import Clock
    from twisted.test.iosim import connectedServerAndClient

    from pop3shield.state import LoginHistory
    from pop3shield.workers import RemoteState, SharedLocalState, StateServer, WorkerChannel

    class Parent:
        state = SharedLocalState(Clock().seconds)

        def channel_lost(self, channel: object) -> None:
            pass

    parent = Parent()
    workers = []
    for _ in range(2):
        channel, _server, pump = connectedServerAndClient(lambda: StateServer(parent), WorkerChannel)
        channel.transport.connected = True  # what a real UNIX transport says (iosim's fake has no such flag)
        workers.append((RemoteState(channel), pump))

    def ask(n: int, d):
        out: list = []
        d.addBoth(out.append)
        workers[n][1].flush()
        assert out, "the supervisor answered"
        return out[0]

    assert ask(0, workers[0][0].failed("192.0.2.1", "bob")) == 1
    assert ask(1, workers[1][0].counts("192.0.2.1", "bob")) == LoginHistory(1, 1, 1, known=False)
    ask(0, workers[0][0].succeeded("192.0.2.1", "bob"))
    assert ask(1, workers[1][0].counts("192.0.2.1", "bob")) == LoginHistory(0, 0, 0, known=True)
    assert ask(1, workers[1][0].counts("192.0.2.1", None)) == LoginHistory(0)
