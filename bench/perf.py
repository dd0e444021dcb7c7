"""pop3shield on its Maildir against Dovecot (shipped and high-performance login) and perdition.

    python bench/perf.py [--duration 4] [--rounds 2] [--idle 2000] [--workers N]
    python bench/perf.py --idle 50000          # the 50,000 idle connections of issue 12

Starts, on loopback and under one temporary directory, on copies of one generated Maildir with
``{PLAIN}`` users on every side (so the comparison is about the servers, not the hash):

* ``dovecot-hp``: a private Dovecot (tests/support/dovecot.py) in high-performance login mode
  (``service_count = 0`` for pop3-login, ``process_min_avail`` = the number of cores);
* ``dovecot``: a second one in its shipped login mode (one login process per connection);
* ``perdition``: perdition (Debian ``perdition``, plain TCP) in front of ``dovecot-hp``;
* ``pop3shield``: pop3shield with the Maildir backend (every protection at its default).

Then, round after round with the servers in a rotating order (so the machine's other work hits
all of them alike), it measures:

* full sessions per second at 1, 8 and 32 concurrent clients: connect, greeting, USER, PASS, STAT,
  LIST, UIDL, RETR 1 (4 KB), QUIT, every reply checked against what the Maildir holds; each client
  is one user (Dovecot locks a mailbox per session) and the clients come from eight 127.0.0.x
  source addresses, so that no per-address limit is what is measured;
* a 20 MB RETR: MB/s of the message body;
* pipelining: 100 commands (STAT, LIST 1, UIDL 1, NOOP) per write, commands per second;
* idle connections: ``--idle`` connections greeted and held, from as many source addresses as
  needed (at most 200 each); memory per connection is the growth of the summed PSS of all the
  server's processes (/proc/PID/smaps_rollup) divided by the count.

Server CPU comes from /proc: utime + stime + cutime + cstime summed over every process in the
server's session (each server runs in a session of its own, so Dovecot's login and pop3 children
and perdition's per-connection children are included; for perdition, its Dovecot too). The load
generator runs in separate processes, never in a server's session. It prints one Markdown table:
raw figures per server and the ratio pop3shield / Dovecot high-performance. Loopback only;
every phase is bounded in time and count; the servers are stopped by PID.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import random
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from relay import Perdition  # noqa: E402
from tests.support.dovecot import DovecotServer  # noqa: E402
from tests.support.pop3shield_server import Pop3ShieldServer  # noqa: E402

CLIENT_COUNTS = (1, 8, 32)
SOURCES = [f"127.0.0.{n}" for n in range(2, 10)]  # honest users' addresses
MESSAGES = 10
SMALL = 4096
BIG = 20 * 1024 * 1024
PIPELINE = 100
PIPE_WRITES = 10  # 1,000 pipelined commands a session: within max_commands' 1000 + 5 x messages
TICK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- the Maildir

def message(rng: random.Random, tag: str, size: int) -> bytes:
    """CRLF lines, some starting with a dot (so both sides stuff), about ``size`` octets."""
    lines = [f"Subject: {tag}", f"Message-ID: <{tag}@bench.invalid>", ""]
    total = sum(len(line) + 2 for line in lines)
    alphabet = "abcdefghij klmnop."
    while total < size:
        line = "".join(rng.choice(alphabet) for _ in range(rng.randint(20, 76)))
        if rng.random() < 0.02:
            line = "." + line
        lines.append(line)
        total += len(line) + 2
    return ("\r\n".join(lines) + "\r\n").encode()


def big_message(rng: random.Random) -> bytes:
    block = message(rng, "big", 64 * 1024).split(b"\r\n\r\n", 1)[1]
    head = b"Subject: big\r\nMessage-ID: <big@bench.invalid>\r\n\r\n"
    return head + block * (BIG // len(block))


def stuffed(body: bytes) -> bytes:
    """The multi-line response body as RFC 1939 sends it (after the +OK line)."""
    out = body.replace(b"\r\n.", b"\r\n..")
    if out.startswith(b"."):
        out = b"." + out
    return out + b".\r\n"


def users(clients: int) -> dict[str, str]:
    accounts = {f"u{n}": f"bench-password-{n}" for n in range(clients)}
    accounts["big"] = "bench-password-big"
    accounts["pipe"] = "bench-password-pipe"
    return accounts


def make_mail(root: Path, accounts: dict[str, str]) -> dict[str, list[bytes]]:
    rng = random.Random(12)
    contents: dict[str, list[bytes]] = {}
    for user in accounts:
        bodies = [big_message(rng)] if user == "big" else [message(rng, f"{user}.{n}", SMALL)
                                                           for n in range(MESSAGES)]
        contents[user] = bodies
        for sub in ("cur", "new", "tmp"):
            (root / user / "Maildir" / sub).mkdir(parents=True, exist_ok=True)
        for n, body in enumerate(bodies):
            (root / user / "Maildir" / "cur" / f"{1700000000 + n}.M{n}P1.{user}:2,S").write_bytes(body)
    return contents


# --------------------------------------------------------------------------- /proc

def session_pids(sid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # field 6 of stat: the session
                pids.append(int(name))
    return pids


def cpu_seconds(sids: list[int]) -> float:
    total = 0
    for sid in sids:
        for pid in session_pids(sid):
            try:
                with open(f"/proc/{pid}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return total / TICK


def pss_kib(sids: list[int]) -> int:
    total = 0
    for sid in sids:
        for pid in session_pids(sid):
            try:
                with open(f"/proc/{pid}/smaps_rollup") as fh:
                    for line in fh:
                        if line.startswith("Pss:"):
                            total += int(line.split()[1])
                            break
            except OSError:
                continue
    return total


# --------------------------------------------------------------------------- the client side

class Conn:
    def __init__(self, host: str, port: int, source: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=60, source_address=(source, 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line, self.buf = self.buf[:end], self.buf[end + 2:]
                return line
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.buf += data

    def ok(self, expect: bytes = b"+OK") -> bytes:
        line = self.line()
        if not line.startswith(expect):
            raise AssertionError(f"expected {expect!r}, got {line[:80]!r}")
        return line

    def multi(self) -> bytes:
        """The body of a multi-line response, up to and including the ``.`` line."""
        data = bytearray(self.buf)
        if data.startswith(b".\r\n"):
            self.buf = data[3:]
            return b".\r\n"
        scanned = 0
        while True:
            end = data.find(b"\r\n.\r\n", scanned)
            if end >= 0:
                self.buf = bytes(data[end + 5:])
                return bytes(data[:end + 5])
            scanned = max(0, len(data) - 4)
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed in a multi-line response")
            data += chunk
            if data.startswith(b".\r\n"):
                self.buf = bytes(data[3:])
                return b".\r\n"

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def login(conn: Conn, user: str, password: str) -> None:
    conn.ok()
    conn.send(f"USER {user}\r\n".encode())
    conn.ok()
    conn.send(f"PASS {password}\r\n".encode())
    conn.ok()


def full_session(host: str, port: int, source: str, user: str, password: str, bodies: list[bytes]) -> None:
    conn = Conn(host, port, source)
    try:
        login(conn, user, password)
        total = sum(len(b) for b in bodies)
        conn.send(b"STAT\r\n")
        conn.ok(f"+OK {len(bodies)} {total}".encode())
        conn.send(b"LIST\r\n")
        conn.ok()
        listing = b"".join(f"{n + 1} {len(b)}\r\n".encode() for n, b in enumerate(bodies)) + b".\r\n"
        got = conn.multi()
        if got != listing:
            raise AssertionError(f"LIST: {got[:80]!r}")
        conn.send(b"UIDL\r\n")
        conn.ok()
        uidl = conn.multi().split(b"\r\n")
        if len(uidl) != len(bodies) + 2 or not all(line.startswith(f"{n + 1} ".encode())
                                                   for n, line in enumerate(uidl[:-2])):
            raise AssertionError(f"UIDL: {uidl[:3]!r}")
        conn.send(b"RETR 1\r\n")
        conn.ok()
        if conn.multi() != stuffed(bodies[0]):
            raise AssertionError("RETR 1: body differs")
        conn.send(b"QUIT\r\n")
        conn.ok()
    finally:
        conn.close()


def _session_clients(args: tuple) -> tuple[int, int]:
    """One load process: its clients as threads, each running sessions until the deadline."""
    import threading

    host, port, clients, deadline, contents, accounts = args
    done = [0] * len(clients)
    errors: list[str] = []

    def run(index: int, user: str, source: str) -> None:
        while time.monotonic() < deadline:
            try:
                full_session(host, port, source, user, accounts[user], contents[user])
                done[index] += 1
            except Exception as exc:  # a failed check: counted, and the first ones printed
                errors.append(f"{user}: {type(exc).__name__}: {exc}")
                time.sleep(0.05)
    threads = [threading.Thread(target=run, args=(i, user, source)) for i, (user, source) in enumerate(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for line in errors[:3]:
        print(f"    error: {line}", file=sys.stderr, flush=True)
    return sum(done), len(errors)


def sessions_load(pool, host: str, port: int, clients: int, duration: float,
                  contents: dict, accounts: dict) -> tuple[int, int, float]:
    plan = [(f"u{n}", SOURCES[n % len(SOURCES)]) for n in range(clients)]
    procs = min(clients, 4)
    deadline = time.monotonic() + duration
    parts = [(host, port, plan[i::procs], deadline, contents, accounts) for i in range(procs)]
    start = time.monotonic()
    results = pool.map(_session_clients, parts)
    elapsed = time.monotonic() - start
    return sum(r[0] for r in results), sum(r[1] for r in results), elapsed


def big_retr(host: str, port: int, duration: float, body: bytes, password: str) -> tuple[int, float]:
    expected = stuffed(body)
    octets, retr_time, end = 0, 0.0, time.monotonic() + duration
    runs = 0
    while runs < 2 or time.monotonic() < end:
        conn = Conn(host, port, SOURCES[0])
        try:
            login(conn, "big", password)
            started = time.monotonic()
            conn.send(b"RETR 1\r\n")
            conn.ok()
            got = conn.multi()
            retr_time += time.monotonic() - started
            if got != expected:
                raise AssertionError("20 MB RETR: body differs")
            octets += len(body)
            conn.send(b"QUIT\r\n")
            conn.ok()
        finally:
            conn.close()
        runs += 1
    return octets, retr_time


PIPE_COMMANDS = (b"STAT\r\n", b"LIST 1\r\n", b"UIDL 1\r\n", b"NOOP\r\n")


def pipelining(host: str, port: int, duration: float, bodies: list[bytes], password: str) -> tuple[int, float]:
    batch = b"".join(PIPE_COMMANDS[i % 4] for i in range(PIPELINE))
    stat = f"+OK {len(bodies)} {sum(len(b) for b in bodies)}".encode()
    expect = (stat, f"+OK 1 {len(bodies[0])}".encode(), b"+OK 1 ", b"+OK")
    commands, busy, end = 0, 0.0, time.monotonic() + duration
    while commands == 0 or time.monotonic() < end:
        conn = Conn(host, port, SOURCES[1])
        try:
            login(conn, "pipe", password)
            started = time.monotonic()
            for _ in range(PIPE_WRITES):
                conn.send(batch)
                for i in range(PIPELINE):
                    line = conn.line()
                    if not line.startswith(expect[i % 4]):
                        raise AssertionError(f"pipelined reply {i}: {line[:60]!r}")
            busy += time.monotonic() - started
            commands += PIPELINE * PIPE_WRITES
            conn.send(b"QUIT\r\n")
            conn.ok()
        finally:
            conn.close()
    return commands, busy


#: idle connections one holder process keeps (below a 20,000 open-file limit with room to spare)
PER_HOLDER = 12000


def _hold(host: str, port: int, first: int, count: int, per_source: int, pipe) -> None:
    """A holder process: ``count`` greeted connections (from 127.x.y.1 addresses), held until told."""
    held = []
    try:
        for n in range(first, first + count):
            a, b = divmod(n // per_source, 250)
            held.append(socket.create_connection((host, port), timeout=60,
                                                 source_address=(f"127.{10 + a}.{b + 1}.1", 0)))
        deadline = time.monotonic() + 300
        for sock in held:
            data = b""
            while not data.endswith(b"\r\n"):
                sock.settimeout(max(1.0, deadline - time.monotonic()))
                chunk = sock.recv(512)
                if not chunk:
                    raise ConnectionError("an idle connection was closed before its greeting")
                data += chunk
            if not data.startswith(b"+OK"):
                raise AssertionError(f"idle connection greeted with {data[:60]!r}")
        pipe.send(("held", count))
    except Exception as exc:
        pipe.send(("error", f"{type(exc).__name__}: {exc} after {len(held)} connections"))
    pipe.recv()  # "release"
    for sock in held:
        sock.close()


def hold_idle(ctx, host: str, port: int, count: int, per_source: int = 200) -> tuple[list, list[str]]:
    """``count`` idle connections held by holder processes; (their handles, errors)."""
    holders, errors = [], []
    for first in range(0, count, PER_HOLDER):
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=_hold, args=(host, port, first, min(PER_HOLDER, count - first), per_source,
                                               theirs))
        proc.start()
        holders.append((proc, mine))
    for proc, pipe in holders:
        kind, value = pipe.recv()
        if kind == "error":
            errors.append(value)
    return holders, errors


def release_idle(holders: list) -> None:
    for proc, pipe in holders:
        pipe.send("release")
    for proc, pipe in holders:
        proc.join(60)


# --------------------------------------------------------------------------- the servers

class Target:
    def __init__(self, name: str, host: str, port: int, sids: list[int]) -> None:
        self.name, self.host, self.port, self.sids = name, host, port, sids


def dovecot_hp_config(idle: int) -> str:
    """service_count = 0 and process_min_avail = cores, as issue 12 has it; each login process
    takes up to 10,000 clients (below the open-file limit), and the master may start more."""
    cores = os.cpu_count() or 1
    per_process = min(max(1000, idle + 1000), 10000)
    return (f"mail_max_userip_connections = 1000\ndefault_client_limit = {max(1000, idle + 1000)}\n"
            f"service pop3-login {{\n  service_count = 0\n  process_min_avail = {cores}\n"
            f"  client_limit = {per_process}\n  vsz_limit = 1G\n}}\n")


def start_servers(work: Path, accounts: dict[str, str], idle: int, workers: int | None) -> tuple[list, dict]:
    started: list = []
    targets: dict[str, Target] = {}
    plain = work / "plain.passwd"
    plain.write_text("".join(f"{u}:{{PLAIN}}{p}\n" for u, p in accounts.items()))
    os.chmod(plain, 0o600)

    shield_server = (f"max_connections = {idle + 1000}\nmax_connections_per_ip = 1000\n"
                     f"login_timeout = 600\n"
                     # each load address opens hundreds of sessions a second, the idle phase
                     # thousands of connections at once: the per-address rate of new connections
                     # (30/s by default) is not what is measured, as Dovecot has no such limit
                     f"new_connections_per_ip = 100000\nnew_connections_burst = 100000\n")
    shield = Pop3ShieldServer(passwd_file=plain, auth_toml="allow_plaintext = true", server_toml=shield_server,
                              startup_timeout=60, workers=workers)
    started.append(shield)
    host, port = shield.start(work / "pop3shield", accounts, work / "pop3shield-mail")
    targets["pop3shield"] = Target("pop3shield", host, port, [shield.proc.pid])

    hp = DovecotServer(extra_config=dovecot_hp_config(idle))
    started.append(hp)
    host, port = hp.start(work / "dovecot-hp", accounts, work / "dovecot-hp-mail")
    targets["dovecot-hp"] = Target("dovecot-hp", host, port, [hp.proc.pid])

    shipped = DovecotServer(extra_config="mail_max_userip_connections = 1000\n")
    started.append(shipped)
    host, port = shipped.start(work / "dovecot", accounts, work / "dovecot-mail")
    targets["dovecot"] = Target("dovecot", host, port, [shipped.proc.pid])

    (work / "perdition").mkdir()
    perdition = Perdition(work / "perdition", (targets["dovecot-hp"].host, targets["dovecot-hp"].port))
    started.append(perdition)
    host, port = perdition.start()
    targets["perdition"] = Target("perdition", host, port, [perdition.proc.pid, hp.proc.pid])
    return started, targets


# --------------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--idle", type=int, default=2000, help="idle connections held (50000: raise the limits)")
    parser.add_argument("--workers", type=int, default=None, help="pop3shield server.workers (default: its own default, the number of cores)")
    parser.add_argument("--only", default="", help="comma-separated servers to measure (default: all)")
    args = parser.parse_args()

    # the open-file limit for this process and the servers it starts (they inherit it): both ends of
    # every idle connection are here; root may raise the hard limit too (up to fs.nr_open)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = min(args.idle, PER_HOLDER) + 4096  # the holders keep the client ends, the servers theirs
    if soft < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(hard, need)))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
        print(f"open-file limit raised to {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}", flush=True)
    accounts = users(max(CLIENT_COUNTS))
    work = Path(tempfile.mkdtemp(prefix="pop3shield-perf-"))
    os.chmod(work, 0o755)
    servers: list = []
    try:
        contents = {}
        for kind in ("pop3shield-mail", "dovecot-hp-mail", "dovecot-mail"):
            contents = make_mail(work / kind, accounts)
        servers, targets = start_servers(work, accounts, args.idle, args.workers)
        if args.only:
            targets = {name: t for name, t in targets.items() if name in args.only.split(",")}
        names = list(targets)
        small = {user: bodies for user, bodies in contents.items() if user.startswith("u")}
        results: dict[str, dict[str, list[float]]] = {name: {} for name in names}

        def record(name: str, key: str, value: float) -> None:
            results[name].setdefault(key, []).append(value)

        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(4) as pool:
            for name in names:  # warm-up: every check once, caches and indexes built
                t = targets[name]
                sessions_load(pool, t.host, t.port, max(CLIENT_COUNTS), 1.0, small, accounts)
            for round_ in range(args.rounds):
                order = names[round_ % len(names):] + names[:round_ % len(names)]
                for clients in CLIENT_COUNTS:
                    for name in order:
                        t = targets[name]
                        cpu0 = cpu_seconds(t.sids)
                        done, errors, elapsed = sessions_load(pool, t.host, t.port, clients, args.duration,
                                                              small, accounts)
                        cpu = cpu_seconds(t.sids) - cpu0
                        record(name, f"sessions/s, {clients} clients", done / elapsed)
                        record(name, f"errors, {clients} clients", errors)
                        if clients == 8:
                            record(name, "CPU ms per session, 8 clients", 1000 * cpu / max(done, 1))
                        print(f"round {round_ + 1}: {name:11s} {clients:2d} clients {done / elapsed:8.1f} "
                              f"sessions/s, CPU {1000 * cpu / max(done, 1):.2f} ms/session, {errors} errors",
                              flush=True)
                for name in order:
                    t = targets[name]
                    cpu0 = cpu_seconds(t.sids)
                    octets, seconds = big_retr(t.host, t.port, args.duration, contents["big"][0],
                                               accounts["big"])
                    cpu = cpu_seconds(t.sids) - cpu0
                    record(name, "RETR 20 MB, MB/s", octets / seconds / 1e6)
                    record(name, "CPU s per GB sent", cpu / (octets / 1e9))
                    commands, seconds = pipelining(t.host, t.port, args.duration, contents["pipe"],
                                                   accounts["pipe"])
                    record(name, "pipelined commands/s", commands / seconds)
                    print(f"round {round_ + 1}: {name:11s} RETR {results[name]['RETR 20 MB, MB/s'][-1]:8.1f} MB/s, "
                          f"CPU {cpu / (octets / 1e9):.2f} s/GB; pipelined "
                          f"{commands / seconds:9.0f} commands/s", flush=True)
        for name in names:
            if name not in ("pop3shield", "dovecot-hp"):
                continue  # shipped Dovecot forks a login process per connection (100 at most); perdition, one each
            t = targets[name]
            time.sleep(0.5)
            before = pss_kib(t.sids)
            started = time.monotonic()
            holders, errors = hold_idle(ctx, t.host, t.port, args.idle)
            time.sleep(1.0)
            after = pss_kib(t.sids)
            record(name, f"idle memory per connection ({args.idle} held), KB", (after - before) * 1024 / 1000
                   / args.idle)
            record(name, f"idle holder processes with errors ({args.idle} connections)", len(errors))
            print(f"idle: {name:11s} {args.idle} held in {time.monotonic() - started:.1f} s, "
                  f"PSS {before} -> {after} KiB; {errors or 'no errors'}", flush=True)
            release_idle(holders)
            time.sleep(2.0)
        print_table(results, names, args)
        return 0
    finally:
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


#: the direction of each figure, for the reader of the ratio
LOWER_IS_BETTER = ("CPU", "idle memory", "errors")


def print_table(results: dict, names: list[str], args: argparse.Namespace) -> None:
    keys = [k for k in results[names[0]]]
    print()
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {os.cpu_count()} cores, {platform.platform()}, "
          f"Python {platform.python_version()}; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"command: python bench/perf.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"{args.rounds} rounds of {args.duration:g} s per figure, the servers in rotating order; "
          f"median of the rounds")
    print()
    header = ["figure", *names, "ratio pop3shield / dovecot-hp"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for key in keys:
        values = {name: statistics.median(results[name][key]) if results[name].get(key) else None for name in names}
        cells = [f"{values[n]:.4g}" if values[n] is not None else "-" for n in names]
        p, d = values.get("pop3shield"), values.get("dovecot-hp")
        ratio = f"{p / d:.2f}" if p is not None and d else "-"
        if ratio != "-" and key.startswith(LOWER_IS_BETTER):
            ratio += " (lower is better)"
        print(f"| {key} | " + " | ".join(cells) + f" | {ratio} |")


if __name__ == "__main__":
    sys.exit(main())
