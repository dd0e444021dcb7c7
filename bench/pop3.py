"""pop3shield against Dovecot on the same machine and the same Maildir content.

    python bench/pop3.py [--messages 200] [--size 4096] [--sessions 30] [--clients 4]

Starts a private Dovecot and a pop3shield (the fixtures of the test suite) over two copies of one
generated Maildir, then times identical workloads against each: whole sessions (login, STAT, UIDL,
RETR of every message, QUIT) from several concurrent clients, and logins alone. It prints seconds
per workload and the ratio pop3shield/Dovecot (below 1.0: pop3shield is faster). Loopback only;
every run is bounded by the counts given.
"""

from __future__ import annotations

import argparse
import os
import poplib
import random
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.dovecot import DovecotServer  # noqa: E402
from tests.support.pop3shield_server import Pop3ShieldServer  # noqa: E402

USER, PASSWORD = "bench", "bench-password-1"


def make_maildir(path: Path, messages: int, size: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    for n in range(messages):
        lines = [f"Subject: message {n}", f"Message-ID: <{n}@bench.invalid>", ""]
        while sum(len(line) + 1 for line in lines) < size:
            line = "".join(rng.choice("abcdefghij klmnop.") for _ in range(rng.randint(20, 76)))
            lines.append(line)
        (path / "cur" / f"{1700000000 + n}.M{n}P1.bench:2,S").write_text("\n".join(lines) + "\n")


def session(host: str, port: int) -> int:
    client = poplib.POP3(host, port, timeout=30)
    client.user(USER)
    client.pass_(PASSWORD)
    count, _ = client.stat()
    client.uidl()
    octets = 0
    for n in range(1, count + 1):
        octets += sum(len(line) + 2 for line in client.retr(n)[1])
    client.quit()
    return octets


def login_only(host: str, port: int) -> int:
    client = poplib.POP3(host, port, timeout=30)
    client.user(USER)
    client.pass_(PASSWORD)
    client.quit()
    return 0


def timed(work, host: str, port: int, sessions: int, clients: int) -> float:
    """Wall time for ``sessions`` runs of ``work`` spread over ``clients`` threads (same user: serial)."""
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda _: work(host, port), range(sessions)))
    return time.perf_counter() - start


def best_of(runs: int, *args) -> float:
    return min(timed(*args) for _ in range(runs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--logins", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pop3shield-bench-"))
    os.chmod(work, 0o755)
    servers = {}
    try:
        for kind, cls in (("dovecot", DovecotServer), ("pop3shield", Pop3ShieldServer)):
            root = work / kind / "mail"
            make_maildir(root / USER / "Maildir", args.messages, args.size)
            server = cls() if kind == "dovecot" else Pop3ShieldServer(
                server_toml="auth_failure_delay = 0.0\nauth_failure_delay_max = 0.0\nmax_connections_per_ip = 1000")
            servers[kind] = server
            server.start(work / kind / "run", {USER: PASSWORD}, root)
        results: dict[str, dict[str, float]] = {}
        for kind, server in servers.items():
            session(server.host, server.port)  # warm caches (Dovecot's index, our size cache)
            results[kind] = {
                "sessions": best_of(args.runs, session, server.host, server.port, args.sessions, 1),
                "logins": best_of(args.runs, login_only, server.host, server.port, args.logins, 1),
            }
        print(f"workload: {args.messages} messages of ~{args.size} octets; {args.sessions} full sessions "
              f"(login, STAT, UIDL, RETR all, QUIT) and {args.logins} logins; best of {args.runs}")
        print(f"{'workload':<12}{'dovecot s':>12}{'pop3shield s':>14}{'ratio':>8}")
        for name in ("sessions", "logins"):
            d, p = results["dovecot"][name], results["pop3shield"][name]
            print(f"{name:<12}{d:>12.3f}{p:>14.3f}{p / d:>8.2f}")
        return 0
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
