"""Attack bench (issue 10): honest sessions' success and latency while a live server is attacked.

    python bench/attack.py [--scenario NAME ...] [--quick] [--duration S] [--json FILE] [--check]

Starts its own pop3shield (a child process from ``tests/support/pop3shield_server.py``, own config,
passwd file and Maildirs under a temp dir, listening on 127.0.0.1 only) with the settings an operator
ships, except what a bench must set (port, paths, passwd file; ``auth.allow_plaintext`` because the
passwd file is a migration in progress: mostly ``{PLAIN}``, some ``{ARGON2ID}`` and ``{BLF-CRYPT}``).
A steady stream of honest sessions (4 concurrent clients, each its own user and its own loopback
address 127.0.0.11-14, two of them with 48-character passwords; each session greeting, USER, PASS,
STAT, RETR 1, QUIT, every reply checked, 0.5 s apart per client) measures success and latency,
first with no attack (baseline), then for each scenario while the attack runs from a separate
process (so the load generator's CPU is its own, and measured), and once more with no attack at the
end (baseline-end: how much the machine's own load moved the figures):

  brute-one     brute force with wrong passwords from one address (20 connections)
  brute-many    brute force from 250 addresses in 250 /24s (127.2.x.1), one connection each
  slowloris     1,000 half-open connections (greeting read, "USER " sent, no CRLF) from 10 addresses
  detector      40 connections (one /24) sending long random-letter USER lines (the detector's slow tier)
  pipeline      10 logged-in clients pipelining 600 RETR (200 messages of 60 KiB, 3 times), never reading
  uidl          one logged-in client pipelining 1,500 UIDL on a 12,000-message mailbox, never reading
  byte-per-sec  40 connections sending one byte per second before login
  slow-reader   2 logged-in clients reading a 40 MB RETR at about 40 KB/s

Each scenario gets a freshly started server (its peak RSS, VmHWM, and its failure counts are its own).
Per scenario it prints honest success, p50/p99 next to the baseline, p99 / baseline p99, the server's
peak RSS, its CPU, the attack's own counters, the bench's CPU, the seconds the first honest session
took after the attack stopped, and PASS/FAIL for the targets of issue 10: honest success 100%,
p99 <= 2x baseline p99, memory bounded (peak RSS <= baseline peak + ``--rss-margin`` MiB), no wrong
password accepted (every ``+OK`` to an attacker's PASS is counted). Everything is bounded in count and
time (about 6 minutes in all; ``--quick`` is a smoke run of seconds per scenario), loopback only, and
every process and socket the bench starts is stopped by the bench (the server and the attack process
by PID).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import random
import resource
import secrets
import shutil
import signal
import socket
import string
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pop3shield.passwd import format_entry, hash_password  # noqa: E402
from tests.support.pop3shield_server import Pop3ShieldServer  # noqa: E402

HOST = "127.0.0.1"
HONEST_ADDRESSES = ("127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14")
HONEST_PAUSE = 0.5  # seconds between one honest client's sessions
ALNUM = string.ascii_letters + string.digits
TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- scale


@dataclass(frozen=True)
class Scale:
    duration: float = 20.0  # seconds of honest measurement per scenario
    ramp: float = 10.0  # at most this long for the attack to be in place before measuring
    recovery: float = 20.0  # at most this long for the first honest session after the attack
    session_timeout: float = 30.0  # an honest session taking longer counts as failed
    brute_one: int = 20
    brute_many: int = 250
    slowloris: int = 1000
    slowloris_addresses: int = 10
    detector: int = 40
    pipeline_clients: int = 10
    pipeline_messages: int = 200
    pipeline_size: int = 60 * 1024  # under 64 KiB, with CRLF line ends too
    pipeline_rounds: int = 3  # RETR 1..messages this many times in one pipeline
    big_messages: int = 12_000
    uidl_commands: int = 1500
    byte_conns: int = 40
    slow_readers: int = 2
    slow_size: int = 40_000_000


FULL = Scale()
QUICK = Scale(duration=4.0, ramp=4.0, recovery=10.0, session_timeout=15.0, brute_one=10,
              brute_many=40, slowloris=200, slowloris_addresses=4, detector=20,
              pipeline_clients=3, pipeline_messages=50, pipeline_rounds=1, big_messages=2000, uidl_commands=300,
              byte_conns=10, slow_readers=1, slow_size=4_000_000)

SCENARIOS = ("brute-one", "brute-many", "slowloris", "detector", "pipeline", "uidl",
             "byte-per-sec", "slow-reader")


# --------------------------------------------------------------------------- users and mail


@dataclass(frozen=True)
class Account:
    user: str
    password: str
    scheme: str


def _password(length: int) -> str:
    return "".join(secrets.choice(ALNUM) for _ in range(length))


def honest_accounts() -> list[Account]:
    """Four honest users, two with 48-character passwords, over the three schemes."""
    return [Account("honest1", _password(48), "PLAIN"), Account("honest2", _password(48), "ARGON2ID"),
            Account("honest3", _password(16), "BLF-CRYPT"), Account("honest4", _password(16), "ARGON2ID")]


def write_message(cur: Path, n: int, size: int, rng: random.Random) -> None:
    lines = [f"From: sender{n}@example.test", "To: rcpt@example.test", f"Subject: message {n}",
             f"Message-ID: <{n}.{rng.random()}@bench.invalid>", ""]
    body = []
    have = sum(len(line) + 1 for line in lines)
    while have < size:
        line = "".join(rng.choice("abcdefghij klmnop.") for _ in range(72))
        body.append(line)
        have += 73
    data = ("\n".join(lines + body) + "\n").encode()
    (cur / f"{1700000000 + n}.M{n}P1.bench:2,S").write_bytes(data)


def write_maildir(root: Path, user: str, count: int, size: int, seed: int) -> None:
    rng = random.Random(seed)
    for sub in ("cur", "new", "tmp"):
        (root / user / "Maildir" / sub).mkdir(parents=True, exist_ok=True)
    cur = root / user / "Maildir" / "cur"
    if size > 1_000_000:  # one big message: repeat a block rather than draw 40 MB of randomness
        block = "".join(rng.choice("abcdefghij klmnop.") + ("\n" if i % 72 == 71 else "")
                        for i in range(73 * 1000)).encode()
        head = b"From: big@example.test\nSubject: big\n\n"
        with open(cur / f"{1700000000}.M0P1.bench:2,S", "wb") as fh:
            fh.write(head)
            for _ in range(size // len(block) + 1):
                fh.write(block)
        return
    for n in range(count):
        write_message(cur, n, size, rng)


# --------------------------------------------------------------------------- a few POP3 helpers


async def connect(src: str, port: int, *, rcvbuf: int | None = None, timeout: float = 10.0):
    """A stream pair from the loopback source address ``src`` (127.0.0.0/8 is all ours)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((src, 0))
        sock.setblocking(False)
        async with asyncio.timeout(timeout):  # not wait_for: in 3.11 it can swallow a cancel
            await loop.sock_connect(sock, (HOST, port))
        return await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise


class Refused(Exception):
    """A reply other than +OK: its first line, as the reason."""


async def ok(reader: asyncio.StreamReader) -> bytes:
    line = await reader.readline()
    if not line:
        raise Refused("connection closed")
    if not line.startswith(b"+OK"):
        raise Refused(line.decode("ascii", "replace").strip()[:70])
    return line


async def command(reader, writer, text: str) -> bytes:
    writer.write(text.encode() + b"\r\n")
    await writer.drain()
    return await ok(reader)


async def multiline(reader: asyncio.StreamReader) -> int:
    size = 0
    while True:
        line = await reader.readline()
        if not line:
            raise Refused("connection closed in a multi-line reply")
        if line == b".\r\n":
            return size
        size += len(line)


async def close(writer: asyncio.StreamWriter | None) -> None:
    if writer is None:
        return
    writer.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2):
            await writer.wait_closed()


async def login(reader, writer, account: Account, timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        await ok(reader)
        await command(reader, writer, f"USER {account.user}")
        await command(reader, writer, f"PASS {account.password}")


# --------------------------------------------------------------------------- honest sessions


async def honest_session(port: int, src: str, account: Account, timeout: float) -> tuple[bool, float, str]:
    start = time.monotonic()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await connect(src, port)
            await ok(reader)
            await command(reader, writer, f"USER {account.user}")
            await command(reader, writer, f"PASS {account.password}")
            await command(reader, writer, "STAT")
            await command(reader, writer, "RETR 1")
            if await multiline(reader) < 1000:
                raise Refused("short message")
            await command(reader, writer, "QUIT")
        return True, time.monotonic() - start, ""
    except Refused as exc:
        return False, time.monotonic() - start, str(exc)
    except TimeoutError:
        return False, time.monotonic() - start, f"no answer within {timeout:.0f} s"
    except OSError as exc:
        return False, time.monotonic() - start, type(exc).__name__
    finally:
        await close(writer)


async def honest_stream(port: int, accounts: list[Account], until: float, timeout: float,
                        results: list[tuple[bool, float, str, str]]) -> None:
    async def worker(account: Account, src: str) -> None:
        while time.monotonic() < until:
            good, took, reason = await honest_session(port, src, account, timeout)
            results.append((good, took, reason, account.user))
            await asyncio.sleep(HONEST_PAUSE)

    await asyncio.gather(*(worker(a, src) for a, src in zip(accounts, HONEST_ADDRESSES)))


# --------------------------------------------------------------------------- the attacks (child process)


class Attack:
    """Shared state of one attack run: counters, open sockets, readiness."""

    def __init__(self, port: int, scale: Scale, honest: list[str], accounts: dict[str, list[Account]]):
        self.port = port
        self.scale = scale
        self.honest = honest
        self.accounts = accounts
        self.stats: Counter[str] = Counter()
        self.open = 0
        self.ready = asyncio.Event()
        self.rng = random.Random(7)
        self.stopping = False
        self.writers: set[asyncio.StreamWriter] = set()

    async def slot(self, src: str, body, *, backoff: tuple[float, float] = (0.05, 0.2),
                   rcvbuf: int | None = None, once: bool = False) -> None:
        """Connect from ``src`` and run ``body`` on the connection, again and again (bounded by the run)."""
        while not self.stopping:
            writer = None
            try:
                reader, writer = await connect(src, self.port, rcvbuf=rcvbuf)
                self.writers.add(writer)
                self.open += 1
                self.stats["peak_open"] = max(self.stats["peak_open"], self.open)
                self.stats["connections"] += 1
                try:
                    await body(reader, writer)
                finally:
                    self.open -= 1
            except Refused as exc:
                self.stats["refused: " + str(exc)[:48]] += 1
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                self.stats["error: " + type(exc).__name__] += 1
            finally:
                self.writers.discard(writer)  # type: ignore[arg-type]
                await close(writer)
            if once:
                return
            await asyncio.sleep(self.rng.uniform(*backoff))

    # -- brute force: wrong passwords for the honest users and for common names
    async def brute_body(self, reader, writer) -> None:
        await ok(reader)
        targets = self.honest + ["admin", "test", "info", "root"]
        while True:
            user = self.rng.choice(targets)
            wrong = "wrong-" + "".join(self.rng.choice(ALNUM) for _ in range(self.rng.randint(4, 10)))
            writer.write(f"USER {user}\r\n".encode())
            await writer.drain()
            line = await reader.readline()
            if not line.startswith(b"+OK"):
                self.stats["USER refused"] += 1
                return
            writer.write(f"PASS {wrong}\r\n".encode())
            await writer.drain()
            async with asyncio.timeout(60):
                line = await reader.readline()
            if line.startswith(b"+OK"):
                self.stats["wrong_accepted"] += 1
                return
            if not line:
                return
            self.stats["PASS refused"] += 1

    async def brute_one(self) -> list:
        self.ready.set()
        return [self.slot("127.0.1.1", self.brute_body) for _ in range(self.scale.brute_one)]

    async def brute_many(self) -> list:
        self.ready.set()
        # one address in each of 250 /24 networks: no grouping by network makes them one source
        return [self.slot(f"127.2.{1 + n % 250}.1", self.brute_body) for n in range(self.scale.brute_many)]

    # -- slowloris: half a command, then nothing
    async def slowloris_body(self, reader, writer) -> None:
        await ok(reader)
        writer.write(b"USER ")
        await writer.drain()
        self.stats["held"] += 1
        self.stats["peak_held"] = max(self.stats["peak_held"], self.stats["held"])
        try:
            if self.stats["held"] >= self.scale.slowloris:
                self.ready.set()
            while await reader.read(4096):
                pass
            self.stats["closed by server"] += 1
        finally:
            self.stats["held"] -= 1

    async def slowloris(self) -> list:
        count, addresses = self.scale.slowloris, self.scale.slowloris_addresses
        ramp = self.scale.ramp * 0.6

        async def staggered(n: int):
            await asyncio.sleep(ramp * n / count)
            await self.slot(f"127.0.3.{1 + n % addresses}", self.slowloris_body, backoff=(1.0, 3.0))

        async def in_place():
            await asyncio.sleep(ramp + 1.0)  # every slot has tried once; those refused keep retrying
            self.ready.set()

        return [staggered(n) for n in range(count)] + [in_place()]

    # -- long random-letter USER lines: every one goes to the detector's slow tier, none is cached
    async def detector_body(self, reader, writer) -> None:
        await ok(reader)
        while True:
            name = "".join(self.rng.choice(string.ascii_lowercase) for _ in range(240))
            writer.write(f"USER {name}\r\n".encode())
            await writer.drain()
            line = await reader.readline()
            if not line:
                return
            self.stats["lines"] += 1
            if line.startswith(b"-ERR [SYS/TEMP]"):
                self.stats["busy"] += 1

    async def detector(self) -> list:
        self.ready.set()
        return [self.slot(f"127.0.4.{1 + n % 4}", self.detector_body) for n in range(self.scale.detector)]

    # -- logged-in clients that pipeline and never read
    async def _hold(self) -> None:
        await asyncio.Event().wait()  # until the run is cancelled

    def _when_all(self, key: str, count: int) -> None:
        self.stats[key] += 1
        if self.stats[key] >= count:
            self.ready.set()

    async def pipeline(self) -> list:
        count = self.scale.pipeline_messages

        def body(account: Account):
            async def run(reader, writer) -> None:
                await login(reader, writer, account)
                once = b"".join(b"RETR %d\r\n" % n for n in range(1, count + 1))
                writer.write(once * self.scale.pipeline_rounds)
                self._when_all("pipelined", len(self.accounts["pipe"]))
                await self._hold()
            return run

        return [self.slot(f"127.0.5.{1 + n}", body(a), backoff=(1, 2))
                for n, a in enumerate(self.accounts["pipe"])]

    async def uidl(self) -> list:
        account = self.accounts["big"][0]

        async def run(reader, writer) -> None:
            await login(reader, writer, account, timeout=120)
            writer.write(b"UIDL\r\n" * self.scale.uidl_commands)
            self._when_all("pipelined", 1)
            await self._hold()

        return [self.slot("127.0.6.1", run, once=True)]

    # -- one byte per second before login, never a line end
    async def byte_body(self, reader, writer) -> None:
        await ok(reader)
        self._when_all("trickling", self.scale.byte_conns)
        for byte in (b"USER " + string.ascii_lowercase.encode() * 10):
            writer.write(bytes([byte]))
            await writer.drain()
            self.stats["bytes"] += 1
            await asyncio.sleep(1.0)

    async def byte_per_sec(self) -> list:
        return [self.slot(f"127.0.7.{1 + n % 2}", self.byte_body, backoff=(0.5, 1.0))
                for n in range(self.scale.byte_conns)]

    # -- a slow reader during RETR of a large message
    async def slow_reader(self) -> list:
        def body(account: Account):
            async def run(reader, writer) -> None:
                await login(reader, writer, account)
                await command(reader, writer, "RETR 1")
                self._when_all("reading", len(self.accounts["slow"]))
                while True:
                    data = await reader.read(4096)
                    if not data:
                        return
                    self.stats["octets read"] += len(data)
                    await asyncio.sleep(0.1)
            return run

        return [self.slot(f"127.0.8.{1 + n}", body(a), rcvbuf=8192, backoff=(1, 2))
                for n, a in enumerate(self.accounts["slow"])]


async def _attack_main(conn, name: str, port: int, scale: Scale, honest: list[str],
                       accounts: dict[str, list[Account]]) -> None:
    attack = Attack(port, scale, honest, accounts)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_reader(conn.fileno(), stop.set)
    before = os.times()
    started = time.monotonic()
    coros = await getattr(attack, name.replace("-", "_"))()
    tasks = [asyncio.create_task(c) for c in coros]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(attack.ready.wait(), scale.ramp)
    conn.send(("ready", time.monotonic() - started, dict(attack.stats)))
    ready_at = os.times()
    await stop.wait()
    loop.remove_reader(conn.fileno())
    ended = os.times()
    attack.stopping = True
    for writer in list(attack.writers):
        writer.transport.abort()
    pending = set(tasks)
    for _ in range(20):  # cancel again what did not end: a cancel can be lost in a race
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
        if not pending:
            break
    attack.stats["slots not ended"] = len(pending)
    cpu = (ended.user + ended.system) - (ready_at.user + ready_at.system)
    with contextlib.suppress(OSError):  # the parent may be gone (an interrupted run)
        conn.send(("done", dict(attack.stats), cpu,
                   (ready_at.user + ready_at.system) - (before.user + before.system)))


def _attack_child(conn, name, port, scale, honest, accounts) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    asyncio.run(_attack_main(conn, name, port, scale, honest, accounts))


# --------------------------------------------------------------------------- measuring the server


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in KiB."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def proc_cpu(pid: int) -> float:
    """Seconds of CPU used by ``pid`` (user + system, all its threads)."""
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS
    return 0.0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)  # nearest rank
    return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]


@dataclass
class Result:
    scenario: str
    sessions: int = 0
    ok: int = 0
    p50: float | None = None
    p99: float | None = None
    failures: dict[str, int] = field(default_factory=dict)
    peak_rss_mib: float = 0.0
    start_rss_mib: float = 0.0
    server_cpu: float = 0.0  # share of one core over the measurement
    attack: dict[str, int] = field(default_factory=dict)
    attack_ramp_s: float = 0.0
    attack_cpu: float = 0.0  # share of one core over the measurement
    honest_cpu: float = 0.0
    recovery_s: float | None = None
    honest_events: int = 0
    wrong_accepted: int = 0
    targets: dict[str, bool] = field(default_factory=dict)
    samples: list[tuple[bool, float, str]] = field(default_factory=list)  # (ok, seconds, user)
    pids: list[int] = field(default_factory=list)  # the server's and the attack process's

    @property
    def success(self) -> float:
        return 100.0 * self.ok / self.sessions if self.sessions else 0.0


class Bench:
    def __init__(self, work: Path, scale: Scale, scenarios: list[str]):
        self.work = work
        self.scale = scale
        self.scenarios = scenarios
        self.mail = work / "mail"
        self.honest = honest_accounts()
        self.accounts: dict[str, list[Account]] = {"pipe": [], "big": [], "slow": []}
        self.passwd = work / "users.passwd"
        self.config_text = ""

    def prepare(self) -> None:
        s = self.scale
        lines = []
        for n, account in enumerate(self.honest):
            write_maildir(self.mail, account.user, 5, 4096, seed=n)
        if "pipeline" in self.scenarios:
            self.accounts["pipe"] = [Account(f"pipe{n}", _password(16), "PLAIN")
                                     for n in range(1, s.pipeline_clients + 1)]
            for n, account in enumerate(self.accounts["pipe"]):
                write_maildir(self.mail, account.user, s.pipeline_messages, s.pipeline_size, seed=100 + n)
        if "uidl" in self.scenarios:
            self.accounts["big"] = [Account("big", _password(16), "PLAIN")]
            write_maildir(self.mail, "big", s.big_messages, 600, seed=200)
        if "slow-reader" in self.scenarios:
            self.accounts["slow"] = [Account(f"slow{n}", _password(16), "PLAIN")
                                     for n in range(1, s.slow_readers + 1)]
            for n, account in enumerate(self.accounts["slow"]):
                write_maildir(self.mail, account.user, 1, s.slow_size, seed=300 + n)
        everyone = self.honest + [a for group in self.accounts.values() for a in group]
        for account in everyone:
            lines.append(format_entry(account.user, hash_password(account.password, account.scheme)) + "\n")
        fd = os.open(self.passwd, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.writelines(lines)

    def start_server(self, name: str) -> Pop3ShieldServer:
        server = Pop3ShieldServer(passwd_file=self.passwd, auth_toml="allow_plaintext = true")
        users = {a.user: "" for a in self.honest}
        server.start(self.work / "run" / name, users, self.mail)
        if not self.config_text and server.conf_path is not None:
            self.config_text = server.conf_path.read_text()
        return server

    async def _warm(self, server: Pop3ShieldServer, name: str) -> None:
        """One session per honest user before anything is measured (verdict cache, page cache)."""
        port = server.port
        assert port is not None
        warm = await asyncio.gather(*(honest_session(port, src, a, self.scale.session_timeout)
                                      for a, src in zip(self.honest, HONEST_ADDRESSES)))
        if name == "baseline" and not all(good for good, _, _ in warm):
            raise RuntimeError(f"honest warm-up failed without any attack: {warm}\n{server.diagnostics()}")

    async def _measure(self, server: Pop3ShieldServer, result: Result, attack_conn) -> None:
        pid = server.proc.pid  # type: ignore[union-attr]
        port = server.port
        assert port is not None
        if attack_conn is not None:
            loop = asyncio.get_running_loop()
            got = await loop.run_in_executor(None, attack_conn.poll, self.scale.ramp + 30)
            if not got:
                raise RuntimeError("the attack process did not report")
            _, result.attack_ramp_s, _ = attack_conn.recv()
        result.start_rss_mib = proc_status(pid).get("VmRSS", 0) / 1024
        cpu0, t0, honest0 = proc_cpu(pid), time.monotonic(), time.process_time()
        samples: list[tuple[bool, float, str, str]] = []
        await honest_stream(port, self.honest, t0 + self.scale.duration, self.scale.session_timeout, samples)
        elapsed = time.monotonic() - t0
        result.server_cpu = (proc_cpu(pid) - cpu0) / elapsed
        result.honest_cpu = (time.process_time() - honest0) / elapsed
        if attack_conn is not None:
            attack_conn.send("stop")
            got = await asyncio.get_running_loop().run_in_executor(None, attack_conn.poll, 30)
            if got:
                _, stats, cpu, _ramp_cpu = attack_conn.recv()
                result.attack = stats
                result.attack_cpu = cpu / elapsed
                result.wrong_accepted = stats.get("wrong_accepted", 0)
            else:
                result.attack = {"no report": 1}
        # the first honest session after the attack stopped
        t1 = time.monotonic()
        while time.monotonic() - t1 < self.scale.recovery:
            good, _, _ = await honest_session(port, HONEST_ADDRESSES[0], self.honest[0],
                                              self.scale.recovery)
            if good:
                result.recovery_s = time.monotonic() - t1
                break
            await asyncio.sleep(0.2)
        result.peak_rss_mib = proc_status(pid).get("VmHWM", 0) / 1024
        result.sessions = len(samples)
        result.ok = sum(1 for good, *_ in samples if good)
        times = [t for good, t, *_ in samples if good]
        result.samples = [(good, round(t, 4), user) for good, t, _, user in samples]
        result.p50, result.p99 = percentile(times, 50), percentile(times, 99)
        result.failures = dict(Counter(reason for good, _, reason, _ in samples if not good).most_common(4))

    def run(self, name: str) -> Result:
        result = Result(name)
        server = self.start_server(name)
        result.pids.append(server.proc.pid)  # type: ignore[union-attr]
        child = conn = None
        try:
            asyncio.run(self._warm(server, name))
            if name in SCENARIOS:
                # forked while no event loop runs and no thread exists: the child builds its own loop
                ctx = multiprocessing.get_context("fork")
                conn, child_conn = ctx.Pipe()
                child = ctx.Process(target=_attack_child, daemon=True,
                                    args=(child_conn, name, server.port, self.scale,
                                          [a.user for a in self.honest], self.accounts))
                child.start()
                child_conn.close()
                result.pids.append(child.pid)
            asyncio.run(self._measure(server, result, conn))
            result.honest_events = self._honest_events(server)
        finally:
            if conn is not None:
                conn.close()  # an attack still running (an interrupted run) sees EOF and stops
            if child is not None:
                child.join(10)
                if child.is_alive() and child.pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signal.SIGKILL)
                    child.join(5)
            server.stop()
        return result

    def _honest_events(self, server: Pop3ShieldServer) -> int:
        """Security events naming an honest user or coming from an honest address."""
        names = {a.user for a in self.honest}
        count = 0
        for record in server.events(limit=1.0):
            if record.get("type") != "security":
                continue
            if record.get("user") in names or (record.get("client") or {}).get("address") in HONEST_ADDRESSES:
                count += 1
        return count


# --------------------------------------------------------------------------- report


def judge(result: Result, base: Result, rss_margin: float) -> None:
    result.targets = {
        "success 100%": result.sessions > 0 and result.ok == result.sessions,
        "p99 <= 2x": result.p99 is not None and base.p99 is not None and result.p99 <= 2 * base.p99,
        "memory bounded": result.peak_rss_mib <= base.peak_rss_mib + rss_margin,
        "no wrong password": result.wrong_accepted == 0 and "no report" not in result.attack,
    }


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def attack_summary(stats: dict[str, int]) -> str:
    keep = ("connections", "peak_open", "peak_held", "PASS refused", "wrong_accepted", "lines", "busy",
            "pipelined", "bytes", "octets read", "slots not ended", "no report")
    parts = [f"{k}={stats[k]}" for k in keep if stats.get(k)]
    other = sorted(((v, k) for k, v in stats.items() if k.startswith(("refused", "error"))), reverse=True)
    parts += [f"{k}={v}" for v, k in other[:2]]
    return ", ".join(parts)


def report(results: list[Result], rss_margin: float) -> str:
    base = results[0]
    out = ["| scenario | honest ok | p50 ms | p99 ms (baseline) | p99 / base | peak RSS MiB | server CPU | "
           "wrong pw accepted | events vs honest | first session after | targets |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = "-" if r.p99 is None or not base.p99 else f"{r.p99 / base.p99:.2f}"
        verdict = " ".join(f"{'PASS' if good else 'FAIL'}:{name}" for name, good in r.targets.items())
        after = "-" if r.recovery_s is None else f"{r.recovery_s * 1000:.0f} ms"
        out.append(f"| {r.scenario} | {r.ok}/{r.sessions} ({r.success:.0f}%) | {ms(r.p50)} | "
                   f"{ms(r.p99)} ({ms(base.p99)}) | {ratio} | {r.peak_rss_mib:.0f} | {r.server_cpu * 100:.0f}% | "
                   f"{r.wrong_accepted} | {r.honest_events} | {after} | {verdict or '(baseline)'} |")
    out.append("")
    out.append("| scenario | attack counters | attack ramp | attack CPU | honest-client CPU | honest failures |")
    out.append("|---|---|---|---|---|---|")
    for r in results:
        fails = "; ".join(f"{n}x {reason}" for reason, n in r.failures.items()) or "-"
        out.append(f"| {r.scenario} | {attack_summary(r.attack) or '-'} | {r.attack_ramp_s:.1f} s | "
                   f"{r.attack_cpu * 100:.0f}% | {r.honest_cpu * 100:.0f}% | {fails} |")
    out.append("")
    out.append(f"memory bounded = peak RSS (VmHWM) <= baseline peak {base.peak_rss_mib:.0f} MiB "
               f"+ {rss_margin:.0f} MiB; CPU figures are shares of one core over the measurement")
    return "\n".join(out)


def raise_nofile(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", action="append", choices=SCENARIOS,
                        help="run only these (repeatable); default: all")
    parser.add_argument("--quick", action="store_true", help="a smoke run: seconds per scenario, small counts")
    parser.add_argument("--duration", type=float, help="seconds of honest measurement per scenario")
    parser.add_argument("--rss-margin", type=float, default=128.0,
                        help="MiB over the baseline's peak RSS still counted as bounded (default 128)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--check", action="store_true", help="exit 1 when any target fails")
    args = parser.parse_args(argv)

    scale = QUICK if args.quick else FULL
    if args.duration:
        scale = dataclasses.replace(scale, duration=args.duration)
    scenarios = args.scenario or list(SCENARIOS)
    nofile = raise_nofile(scale.slowloris * 2 + 1024)  # the server child inherits it
    work = Path(tempfile.mkdtemp(prefix="pop3shield-attack-"))
    os.chmod(work, 0o755)
    started = time.monotonic()
    load0 = os.getloadavg()
    try:
        bench = Bench(work, scale, scenarios)
        bench.prepare()
        print(f"attack bench: {len(scenarios)} scenario(s), {scale.duration:.0f} s each, "
              f"{os.cpu_count()} CPUs, load average {load0[0]:.2f}, RLIMIT_NOFILE {nofile}", flush=True)
        results = []
        names = ["baseline"] + scenarios + (["baseline-end"] if len(scenarios) > 1 and not args.quick else [])
        for name in names:
            result = bench.run(name)
            if results:
                judge(result, results[0], args.rss_margin)
            results.append(result)
            print(f"  {name}: {result.ok}/{result.sessions} ok, p99 {ms(result.p99)} ms, "
                  f"peak RSS {result.peak_rss_mib:.0f} MiB, {attack_summary(result.attack)}", flush=True)
        load1 = os.getloadavg()
        print()
        print("config used (the baseline's generated file; each scenario's differs in its run/NAME/ paths "
              "only; every other key at its default):")
        print("    " + bench.config_text.rstrip().replace("\n", "\n    "))
        print()
        print(f"passwd file: {', '.join(f'{a.user} {{{a.scheme}}} {len(a.password)} chars' for a in bench.honest)}"
              f" (honest); attackers' own accounts {{PLAIN}}")
        print(f"honest: {len(bench.honest)} concurrent clients from {', '.join(HONEST_ADDRESSES)}, sessions "
              f"greeting/USER/PASS/STAT/RETR 1 (4 KiB)/QUIT, {HONEST_PAUSE} s apart per client")
        print(f"load average {load0[0]:.2f} at the start, {load1[0]:.2f} at the end; "
              f"{time.monotonic() - started:.0f} s in all")
        print()
        print(report(results, args.rss_margin))
        if args.json:
            args.json.write_text(json.dumps({"scale": scale.__dict__, "results": [r.__dict__ for r in results]},
                                            indent=1))
        failed = any(not good for r in results for good in r.targets.values())
        return 1 if args.check and failed else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
