"""Relay sessions per second: pop3shield in front of Dovecot, Dovecot alone, perdition in front.

    python bench/relay.py [--sessions 400] [--clients 8] [--messages 10] [--size 4096] [--rounds 3]

Starts one private Dovecot (tests/support/dovecot.py) over one Maildir per client, then, in
front of that same Dovecot, a pop3shield with ``[backend] type = "upstream"`` (every protection
at its default, prevent) and a perdition (Debian ``perdition``, plain TCP, no map: every user to
that Dovecot), and, as the floor of any relay written on Twisted, Twisted's own
``twisted.protocols.portforward`` (bytes passed through, nothing parsed or checked). The same load
goes to each, interleaved round by round so that the machine's other work hits them all alike: ``--clients`` concurrent clients (one user each, as Dovecot locks a
mailbox per session), each session connect, USER, PASS, STAT, UIDL, RETR of every message, QUIT.
It prints sessions/s per target (the best round) and the ratios pop3shield/Dovecot and
pop3shield/perdition, taken within each round (the same machine load) and given as the median,
and the forwarder's ratio to Dovecot direct: what a relay that inspects nothing reaches on the same
machine. Loopback only; every run is bounded by the counts given; the servers are stopped by PID.
"""

from __future__ import annotations

import argparse
import os
import platform
import poplib
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import require_binary  # noqa: E402
from tests.support.dovecot import DovecotServer, free_port, wait_for_pop3_greeting  # noqa: E402
from tests.support.pop3shield_server import Pop3ShieldServer  # noqa: E402


def users(clients: int) -> dict[str, str]:
    return {f"bench{n}": f"bench-password-{n}" for n in range(clients)}


def make_maildir(path: Path, messages: int, size: int, seed: int) -> None:
    rng = random.Random(seed)
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    for n in range(messages):
        lines = [f"Subject: message {n}", f"Message-ID: <{seed}.{n}@bench.invalid>", ""]
        while sum(len(line) + 2 for line in lines) < size:
            lines.append("".join(rng.choice("abcdefghij klmnop.") for _ in range(rng.randint(20, 76))))
        (path / "cur" / f"{1700000000 + n}.M{n}P{seed}.bench:2,S").write_bytes(
            ("\r\n".join(lines) + "\r\n").encode())


def one_session(host: str, port: int, user: str, password: str) -> int:
    client = poplib.POP3(host, port, timeout=60)
    try:
        client.user(user)
        client.pass_(password)
        count, _ = client.stat()
        client.uidl()
        octets = 0
        for n in range(1, count + 1):
            octets += sum(len(line) + 2 for line in client.retr(n)[1])
        client.quit()
        return octets
    finally:
        client.close()


_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int) -> float:
    """CPU seconds (user + system) of process ``root`` and its descendants, from /proc: the live
    ones' own time plus what their reaped children used (a forked session process that exited
    is in its parent's cutime/cstime)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        # after the command: state ppid ... utime(14) stime(15) cutime(16) cstime(17), 1-based
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = sum(int(f) for f in fields[11:15]) / _TICK
    total, todo = 0.0, [root]
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    while todo:
        pid = todo.pop()
        total += times.get(pid, 0.0)
        todo.extend(children.get(pid, ()))
    return total


def run_load(host: str, port: int, accounts: dict[str, str], sessions: int) -> tuple[float, int]:
    """``sessions`` sessions spread over one thread per account; (seconds, octets)."""
    names = list(accounts)
    per = [sessions // len(names) + (1 if i < sessions % len(names) else 0) for i in range(len(names))]

    def worker(index: int) -> int:
        user = names[index]
        return sum(one_session(host, port, user, accounts[user]) for _ in range(per[index]))

    start = time.perf_counter()
    with ThreadPoolExecutor(len(names)) as pool:
        octets = sum(pool.map(worker, range(len(names))))
    return time.perf_counter() - start, octets


class Perdition:
    """perdition.pop3 in the foreground, in a process group of its own, stopped by PID."""

    def __init__(self, workdir: Path, upstream: tuple[str, int]) -> None:
        self.binary = require_binary("perdition.pop3", "/usr/sbin")
        self.workdir = workdir
        self.upstream = upstream
        self.host = "127.0.0.1"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> tuple[str, int]:
        argv = [self.binary, "--no_daemon", "-f", "", "--protocol", "POP3",
                "--bind_address", self.host, "--listen_port", str(self.port),
                "--outgoing_server", self.upstream[0], "--outgoing_port", str(self.upstream[1]),
                "--no_lookup", "--ssl_mode", "none", "--pid_file", str(self.workdir / "perdition.pid"),
                "--connection_limit", "0"]
        if os.getuid() == 0:
            argv += ["--username", "nobody", "--group", "nogroup"]
        with open(self.workdir / "perdition.log", "wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, close_fds=True)
        wait_for_pop3_greeting(self.host, self.port, 20, alive=lambda: self.proc.poll() is None,
                               describe=lambda: (self.workdir / "perdition.log").read_text(errors="replace"))
        return self.host, self.port

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # children it forked per connection
        except (ProcessLookupError, PermissionError):
            pass


class Forwarder:
    """Twisted's port forwarder (``twisted.protocols.portforward``) in a child process: the cost of
    the reactor, the two connections and the copying alone, with no POP3 in it."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.host = "127.0.0.1"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> tuple[str, int]:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve-forwarder", str(self.port),
                                      self.upstream[0], str(self.upstream[1])],
                                     stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        wait_for_pop3_greeting(self.host, self.port, 20, alive=lambda: self.proc.poll() is None,
                               describe=lambda: "the forwarder exited")
        return self.host, self.port

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def serve_forwarder(port: int, host: str, upstream_port: int) -> int:
    from twisted.internet import reactor
    from twisted.protocols import portforward

    factory = portforward.ProxyFactory(host, upstream_port)
    factory.noisy = False
    reactor.listenTCP(port, factory, interface="127.0.0.1")
    reactor.run()
    return 0


#: the reference target: Twisted's port forwarder, which inspects nothing
FORWARDER = "Twisted portforward -> Dovecot"

#: pop3shield's server.workers in the bench (POP3SHIELD_WORKERS; default 1, the figure of issue 9)
WORKERS = int(os.environ.get("POP3SHIELD_WORKERS", "1"))


#: pop3shield's [server] lines in the bench: its clients all come from 127.0.0.1, thousands of
#: sessions a minute, and the per-address limits are not what is measured
SERVER_TOML = ("max_connections_per_ip = 1000\nmax_connections = 1000\n"
               "new_connections_per_ip = 100000\nnew_connections_burst = 100000")


def pop3shield_upstream_toml(host: str, port: int) -> str:
    return f'[backend]\ntype = "upstream"\nendpoint = "tcp:host={host}:port={port}"\n'


def main() -> int:
    if sys.argv[1:2] == ["--serve-forwarder"]:  # the child process of Forwarder
        return serve_forwarder(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=400, help="sessions per target per round")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--messages", type=int, default=10)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    accounts = users(args.clients)
    work = Path(tempfile.mkdtemp(prefix="pop3shield-bench-relay-"))
    dovecot = DovecotServer(extra_config="mail_max_userip_connections = 1000\n")
    shield: Pop3ShieldServer | None = None
    perdition: Perdition | None = None
    forwarder: Forwarder | None = None
    try:
        for n, user in enumerate(accounts):
            make_maildir(work / "mail" / user / "Maildir", args.messages, args.size, n + 1)
        d_host, d_port = dovecot.start(work / "dovecot", accounts, work / "mail")
        shield = Pop3ShieldServer(backend_toml=pop3shield_upstream_toml(d_host, d_port), local_passwd=False,
                                  server_toml=SERVER_TOML, workers=WORKERS)
        s_host, s_port = shield.start(work / "pop3shield", accounts, work / "shield-mail-unused")
        perdition = Perdition(work, (d_host, d_port))
        p_host, p_port = perdition.start()
        forwarder = Forwarder((d_host, d_port))
        f_host, f_port = forwarder.start()
        targets = {"Dovecot direct": (d_host, d_port), "pop3shield -> Dovecot": (s_host, s_port),
                   "perdition -> Dovecot": (p_host, p_port), FORWARDER: (f_host, f_port)}
        for host, port in targets.values():  # warm-up, and a check that every target works
            run_load(host, port, accounts, len(accounts))
        pids = {"Dovecot direct": dovecot.proc.pid, "pop3shield -> Dovecot": shield.proc.pid,
                "perdition -> Dovecot": perdition.proc.pid, FORWARDER: forwarder.proc.pid}
        # CPU milliseconds per session, by process tree, per round: the target's own processes
        # (for the two relays not counting Dovecot behind them), and the load generator (this
        # process: every thread)
        cpu: dict[str, list[float]] = {name: [] for name in targets}
        load_cpu: dict[str, list[float]] = {name: [] for name in targets}
        #: and Dovecot's, behind each target (the same processes as "Dovecot direct" itself)
        dovecot_cpu: dict[str, list[float]] = {name: [] for name in targets}
        best: dict[str, float] = {name: 0.0 for name in targets}
        octets_seen: dict[str, int] = {}
        ratios: dict[str, list[float]] = {"direct": [], "perdition": [], "forwarder": []}
        for round_ in range(args.rounds):
            order = list(targets.items())
            if round_ % 2:
                order.reverse()
            rates = {}
            for name, (host, port) in order:
                before, own = tree_cpu(pids[name]), time.process_time()
                behind = tree_cpu(dovecot.proc.pid)
                seconds, octets = run_load(host, port, accounts, args.sessions)
                cpu[name].append((tree_cpu(pids[name]) - before) * 1000 / args.sessions)
                dovecot_cpu[name].append((tree_cpu(dovecot.proc.pid) - behind) * 1000 / args.sessions)
                load_cpu[name].append((time.process_time() - own) * 1000 / args.sessions)
                rates[name] = args.sessions / seconds
                best[name] = max(best[name], rates[name])
                octets_seen[name] = octets
                print(f"round {round_ + 1}: {name:24s} {rates[name]:8.1f} sessions/s, "
                      f"{cpu[name][-1]:5.2f} ms CPU per session (Dovecot {dovecot_cpu[name][-1]:5.2f} ms, "
                      f"load generator {load_cpu[name][-1]:5.2f} ms), "
                      f"load average {os.getloadavg()[0]:.2f}", flush=True)
            ratios["direct"].append(rates["pop3shield -> Dovecot"] / rates["Dovecot direct"])
            ratios["perdition"].append(rates["pop3shield -> Dovecot"] / rates["perdition -> Dovecot"])
            ratios["forwarder"].append(rates[FORWARDER] / rates["Dovecot direct"])
        assert len(set(octets_seen.values())) == 1, f"targets delivered different octets: {octets_seen}"
        print()
        print(f"{args.clients} concurrent clients, {args.sessions} sessions per round, best of {args.rounds} "
              f"rounds; {args.messages} messages of ~{args.size} octets per session")
        print(f"machine: {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}, "
              f"Dovecot {'.'.join(map(str, dovecot.version))}")
        print()
        print("| target | sessions/s | CPU ms per session, median of rounds (the target's processes) |")
        print("|---|---|---|")
        for name, rate in best.items():
            print(f"| {name} | {rate:.1f} | {statistics.median(cpu[name]):.2f} |")
        # ratios within a round (the same machine load), their median over the rounds
        direct, perd = statistics.median(ratios["direct"]), statistics.median(ratios["perdition"])
        print(f"| ratio pop3shield / Dovecot direct, median of rounds | {direct:.2f} (target >= 0.8; "
              f"rounds: {', '.join(f'{r:.2f}' for r in ratios['direct'])}) |")
        print(f"| ratio pop3shield / perdition, median of rounds | {perd:.2f} (target >= 3; "
              f"rounds: {', '.join(f'{r:.2f}' for r in ratios['perdition'])}) |")
        print(f"| reference: ratio {FORWARDER} / Dovecot direct, median of rounds | "
              f"{statistics.median(ratios['forwarder']):.2f} (no target: what relaying alone costs; "
              f"rounds: {', '.join(f'{r:.2f}' for r in ratios['forwarder'])}) |")
        return 0
    finally:
        if forwarder:
            forwarder.stop()
        if perdition:
            perdition.stop()
        if shield:
            shield.stop()
        dovecot.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
