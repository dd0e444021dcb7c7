"""pop3shield's own CPU per relayed session, against a canned upstream that costs next to nothing.

    python bench/relay_cpu.py [--sessions 1000] [--reps 3] [--clients 8] [--profile FILE]

bench/relay.py measures what issue 9 asks (sessions/s beside a real Dovecot), but Dovecot's own CPU
takes most of the machine and its noise hides changes of a few percent in pop3shield. This bench
is for working on pop3shield's cost: the upstream is a canned POP3 server in a child process
(asyncio; every user has the same 10 messages of about 4 KiB and pipelining is honoured), so the
machine is mostly idle apart from pop3shield and the load generator. The sessions are those of
bench/relay.py (connect, USER, PASS, STAT, UIDL, RETR of each message, QUIT, 8 concurrent
poplib clients); pop3shield has the same config (every protection at its default, one worker).
It prints user and system CPU milliseconds per session of the pop3shield process, per repetition
and the minimum, and the same for Twisted's port forwarder in front of the same upstream (the floor
of any relay on Twisted: bytes passed through, nothing parsed).

``--profile FILE``: run pop3shield under cProfile (CPU time of the reactor thread), write the
stats to FILE and print the Python calls per session and the functions with the most own time;
the figures of a profiled run are several times the real ones, read them as shares.
Loopback only; every run is bounded by the counts given; the processes are stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import stat
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MESSAGES = 10
SIZE = 4096


def _canned() -> dict[bytes, bytes]:
    rng = random.Random(1)
    bodies = []
    for n in range(MESSAGES):
        lines = [f"Subject: message {n}".encode(), b""]
        while sum(len(line) + 2 for line in lines) < SIZE:
            lines.append("".join(rng.choice("abcdefghij klmnop.") for _ in range(rng.randint(20, 76))).encode())
        bodies.append(b"\r\n".join(lines) + b"\r\n")
    answers = {
        b"CAPA": b"+OK\r\nTOP\r\nUIDL\r\nPIPELINING\r\nUSER\r\nSASL PLAIN\r\n.\r\n",
        b"STAT": b"+OK %d %d\r\n" % (MESSAGES, sum(map(len, bodies))),
        b"LIST": b"+OK\r\n" + b"".join(b"%d %d\r\n" % (i + 1, len(m)) for i, m in enumerate(bodies)) + b".\r\n",
        b"UIDL": b"+OK\r\n" + b"".join(b"%d uid%08d\r\n" % (i + 1, i) for i in range(MESSAGES)) + b".\r\n",
    }
    for i, body in enumerate(bodies):
        answers[b"RETR %d" % (i + 1)] = (b"+OK %d octets\r\n" % len(body) + body.replace(b"\r\n.", b"\r\n..")
                                         + b".\r\n")
    return answers


def serve_upstream(port: int) -> int:
    """The canned upstream (the child process): any login succeeds, QUIT closes."""
    answers = _canned()

    class Canned(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.buffer = b""
            transport.write(b"+OK canned upstream ready.\r\n")

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            out = []
            while b"\r\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\r\n", 1)
                keyword = line.split(b" ", 1)[0].upper()
                if keyword == b"QUIT":
                    self.transport.write(b"".join(out) + b"+OK bye\r\n")
                    self.transport.close()
                    return
                out.append(answers.get(line) or answers.get(keyword) or b"+OK\r\n")
            if out:
                self.transport.write(b"".join(out))

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Canned, "127.0.0.1", port)
        await server.serve_forever()

    asyncio.run(main())
    return 0


def _cpu(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat", "rb") as handle:
        fields = handle.read().rsplit(b")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick  # utime, stime


def main() -> int:
    if sys.argv[1:2] == ["--serve-upstream"]:
        return serve_upstream(int(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=1000, help="sessions per repetition")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--profile", metavar="FILE", help="cProfile pop3shield, stats to FILE")
    args = parser.parse_args()

    import subprocess

    import relay
    from tests.support.dovecot import free_port, wait_for_pop3_greeting
    from tests.support.pop3shield_server import Pop3ShieldServer

    accounts = relay.users(args.clients)
    work = Path(tempfile.mkdtemp(prefix="pop3shield-bench-relay-cpu-"))
    port = free_port()
    upstream = subprocess.Popen([sys.executable, __file__, "--serve-upstream", str(port)],
                                stdin=subprocess.DEVNULL, start_new_session=True)
    shield = forwarder = None
    extra = {}
    if args.profile:  # Pop3ShieldServer runs "PYTHON -m pop3shield run ...": this PYTHON profiles it
        launcher = work / "profiled.py"
        launcher.write_text(
            "import atexit, cProfile, runpy, sys, time\n"
            "profile = cProfile.Profile(time.thread_time)\n"
            f"atexit.register(lambda: (profile.disable(), profile.dump_stats({os.path.abspath(args.profile)!r})))\n"
            "sys.argv = ['pop3shield'] + sys.argv[3:]  # without '-m pop3shield'\n"
            "profile.enable()\n"
            "runpy.run_module('pop3shield', run_name='__main__', alter_sys=True)\n")
        wrapper = work / "profiled-python"
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{launcher}" "$@"\n')
        wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
        extra["python"] = str(wrapper)
    try:
        wait_for_pop3_greeting("127.0.0.1", port, 20, alive=lambda: upstream.poll() is None,
                               describe=lambda: "the canned upstream exited")
        shield = Pop3ShieldServer(backend_toml=relay.pop3shield_upstream_toml("127.0.0.1", port),
                                  local_passwd=False, workers=1, server_toml=relay.SERVER_TOML, **extra)
        targets = {"pop3shield": shield.start(work / "pop3shield", accounts, work / "unused")}
        forwarder = relay.Forwarder(("127.0.0.1", port))
        targets["Twisted portforward"] = forwarder.start()
        pids = {"pop3shield": shield.proc.pid, "Twisted portforward": forwarder.proc.pid}
        for host, target_port in targets.values():  # warm-up, and a check that both work
            relay.run_load(host, target_port, accounts, 5 * len(accounts))
        for name, (host, target_port) in targets.items():
            if args.profile and name != "pop3shield":
                continue
            runs = []
            for rep in range(args.reps):
                user0, sys0 = _cpu(pids[name])
                seconds, _ = relay.run_load(host, target_port, accounts, args.sessions)
                user1, sys1 = _cpu(pids[name])
                runs.append(((user1 - user0) * 1000 / args.sessions, (sys1 - sys0) * 1000 / args.sessions))
                print(f"{name:20s} rep {rep + 1}: {args.sessions / seconds:6.1f} sessions/s, CPU per session: "
                      f"user {runs[-1][0]:.2f} ms, system {runs[-1][1]:.2f} ms", flush=True)
            best = min(runs, key=sum)
            print(f"{name:20s} least of {args.reps}: user {best[0]:.2f} ms, system {best[1]:.2f} ms, "
                  f"total {sum(best):.2f} ms per session", flush=True)
    finally:
        if forwarder:
            forwarder.stop()
        if shield:
            shield.stop()  # SIGTERM: the profiled server writes its stats at exit
        upstream.terminate()
        upstream.wait(timeout=10)
    if args.profile:
        import pstats

        stats = pstats.Stats(args.profile)
        # the repetitions, the warm-up and the start-up's greeting check
        profiled_sessions = args.reps * args.sessions + 5 * len(accounts) + 1
        print(f"\nprofile in {args.profile}: about {stats.total_calls / profiled_sessions:.0f} Python calls "
              f"per session (start-up included); own time, largest first:")
        stats.sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
