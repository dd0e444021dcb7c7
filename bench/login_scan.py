"""Login + STAT on a big leave-on-server mailbox: the first and the second login, pop3shield vs Dovecot.

    python bench/login_scan.py [--messages 10000] [--size 2048] [--repeat 3]

Builds one Maildir of ``--messages`` messages (plain Maildir names, no ``,S=``/``,W=`` fields, so
every size has to be measured once), copies it for a private Dovecot and for pop3shield (the
fixtures of the test suite), and times a poplib session of USER, PASS, STAT, QUIT against each:

* first login: the server has never seen the mailbox (pop3shield reads every file to size it;
  Dovecot builds its index and cache);
* second login: the same, unchanged mailbox again (pop3shield's size cache, Dovecot's index);
  the best of ``--repeat`` runs.

A third pop3shield mailbox has Maildir++ ``,S=<n>,W=<n>`` names, as Dovecot's LDA and Courier's
maildrop write them: its first login needs no read at all. Loopback only; the files are written
before the servers start, so both find them in the page cache.
"""

from __future__ import annotations

import argparse
import os
import platform
import poplib
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pop3shield.core.dotstuff import wire_size  # noqa: E402
from tests.support.dovecot import DovecotServer  # noqa: E402
from tests.support.pop3shield_server import Pop3ShieldServer  # noqa: E402

USER, PASSWORD = "bench", "bench-password-1"


def make_maildir(path: Path, messages: int, size: int, *, size_fields: bool, seed: int = 1) -> int:
    """Write the mailbox; returns the total POP3 size (what STAT must say)."""
    rng = random.Random(seed)
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    total = 0
    for n in range(messages):
        lines = [f"Subject: message {n}", f"Message-ID: <{n}@bench.invalid>", ""]
        while sum(len(line) + 1 for line in lines) < size:
            lines.append("".join(rng.choice("abcdefghij klmnop.") for _ in range(rng.randint(20, 76))))
        data = ("\n".join(lines) + "\n").encode()
        name = f"{1700000000 + n}.M{n}P1.bench"
        if size_fields:
            name += f",S={len(data)},W={wire_size(data)}"
        (path / "cur" / f"{name}:2,S").write_bytes(data)
        total += wire_size(data)
    return total


def login_stat(host: str, port: int) -> tuple[float, tuple[int, int]]:
    start = time.perf_counter()
    client = poplib.POP3(host, port, timeout=600)
    client.user(USER)
    client.pass_(PASSWORD)
    stat = client.stat()
    client.quit()
    return time.perf_counter() - start, stat


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pop3shield-login-bench-"))
    os.chmod(work, 0o755)
    servers: dict[str, object] = {}
    try:
        expected = {}
        for kind, fields in (("dovecot", False), ("pop3shield", False), ("pop3shield-W", True)):
            expected[kind] = make_maildir(work / kind / "mail" / USER / "Maildir", args.messages, args.size,
                                          size_fields=fields)
        fast = "auth_failure_delay = 0.0\nauth_failure_delay_max = 0.0\nlogin_timeout = 600.0"
        for kind in expected:
            server = DovecotServer() if kind == "dovecot" else Pop3ShieldServer(server_toml=fast)
            server.start(work / kind / "run", {USER: PASSWORD}, work / kind / "mail")
            servers[kind] = server
        rows = {}
        for kind, server in servers.items():
            first, stat = login_stat(server.host, server.port)  # type: ignore[attr-defined]
            assert stat == (args.messages, expected[kind]), (kind, stat, expected[kind])
            second = min(login_stat(server.host, server.port)[0]  # type: ignore[attr-defined]
                         for _ in range(args.repeat))
            rows[kind] = (first, second)
        print(f"{args.messages} messages of ~{args.size} octets; login (USER, PASS) + STAT + QUIT over "
              f"loopback; second = best of {args.repeat}; {os.cpu_count()} CPUs, {platform.python_version()}")
        print()
        print("| server | first login | second login |")
        print("|---|---|---|")
        for kind, (first, second) in rows.items():
            label = {"dovecot": "Dovecot", "pop3shield": "pop3shield",
                     "pop3shield-W": "pop3shield, `,S=`/`,W=` names"}[kind]
            print(f"| {label} | {first * 1000:.0f} ms | {second * 1000:.1f} ms |")
        d, p = rows["dovecot"], rows["pop3shield"]
        print(f"| ratio pop3shield / Dovecot | {p[0] / d[0]:.2f} | {p[1] / d[1]:.2f} |")
        return 0
    finally:
        for server in servers.values():
            server.stop()  # type: ignore[attr-defined]
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
