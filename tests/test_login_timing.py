"""Issue 10, "Brute force": a failed login is answered at a deadline fixed when the command arrived.

Whatever the hash costs, and whether the user exists or not, the -ERR comes at arrival + the
penalty's delay; during an active penalty the password is not checked at all (no thread hashes
for a guesser, and a right password is refused too). In-process with a task.Clock for the
exact times, then over a real socket with a passwd file that mixes {PLAIN}, argon2id and bcrypt.
"""

from __future__ import annotations

import hashlib
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from twisted.internet import defer
from twisted.internet.task import Clock

from pop3shield.backends import LoginRefused
from pop3shield.passwd import ARGON2ID, BLF_CRYPT, PLAIN, PasswdEntry, hash_password, verify_password
from tests.support.pop3shield_server import Pop3ShieldServer
from tests.test_protocol import connect, mailroot, make_factory, take  # noqa: F401 (fixture)

FAILED = b"-ERR [AUTH] Authentication failed.\r\n"


def test_a_slow_hash_does_not_push_the_answer_past_the_deadline(mailroot: Path) -> None:
    clock = Clock()
    factory = make_factory(mailroot, clock, auth_failure_delay=2.0, auth_failure_delay_max=15.0)
    pending: list[defer.Deferred] = []

    def slow_login(credentials, client):
        d = defer.Deferred()
        pending.append(d)
        return d
    factory.backend.login = slow_login
    proto, transport = connect(factory)
    take(transport)
    proto.dataReceived(b"USER bob\r\nPASS guess\r\n")
    assert take(transport) == b"+OK\r\n"
    clock.advance(0.7)  # the hash took 0.7 s
    pending.pop().errback(LoginRefused())
    clock.advance(1.29)
    assert take(transport) == b""
    clock.advance(0.02)  # 2.0 s after PASS arrived, not 2.7
    assert take(transport) == FAILED
    # the next one: the penalty's 4 s, again from arrival, with a hash slower still
    proto.dataReceived(b"USER bob\r\nPASS guess2\r\n")
    take(transport)
    clock.advance(3.0)
    pending.pop().errback(LoginRefused())
    clock.advance(0.99)
    assert take(transport) == b""
    clock.advance(0.02)
    assert take(transport) == FAILED


def test_during_a_penalty_the_password_is_not_checked(mailroot: Path) -> None:
    clock = Clock()
    factory = make_factory(mailroot, clock, auth_failure_delay=1.0, auth_failure_delay_max=15.0,
                           auth_penalty_thresholds=(0, 0, 2))
    checked: list[str] = []
    real_login = factory.backend.login
    factory.backend.login = lambda credentials, client: checked.append(credentials.username) or real_login(
        credentials, client)
    proto, transport = connect(factory)
    take(transport)
    for delay in (1.0, 2.0):
        proto.dataReceived(b"USER alice\r\nPASS typo\r\n")
        take(transport)
        clock.advance(delay)
        assert take(transport) == FAILED
    assert checked == ["alice", "alice"]
    # two failures of the pair: the right password is refused, unchecked, at the penalty's 4 s
    proto.dataReceived(b"USER alice\r\nPASS secret-pw\r\n")
    assert take(transport) == b"+OK\r\n"
    clock.advance(3.99)
    assert take(transport) == b""
    clock.advance(0.02)
    assert take(transport) == FAILED
    assert checked == ["alice", "alice"]
    # another user from the same address is still checked (the address is far below its threshold)
    proto.dataReceived(b"USER carol\r\nPASS x\r\n")
    take(transport)
    assert checked == ["alice", "alice", "carol"]
    clock.advance(15)
    assert take(transport) == FAILED


# --------------------------------------------------------------------------- over a real socket

DEADLINE = 3.0  # well above a bcrypt cost 12 verification, even on a loaded machine


def _passwd(path: Path) -> dict[str, str]:
    users = {"plain": "plain-secret", "argon": "argon-secret", "bcrypt": "bcrypt-secret"}
    lines = [f"plain:{hash_password(users['plain'], PLAIN)}\n",
             f"argon:{hash_password(users['argon'], ARGON2ID)}\n",
             f"bcrypt:{hash_password(users['bcrypt'], BLF_CRYPT)}\n"]
    path.write_text("".join(lines), encoding="utf-8")
    path.chmod(0o600)
    return users


def _timed_failure(host: str, port: int, user: str, secret: str, apop: bool = False) -> tuple[float, bytes]:
    with socket.create_connection((host, port), timeout=30) as sock:
        reader = sock.makefile("rb")
        greeting = reader.readline()
        if apop:
            stamp = greeting[greeting.index(b"<"):greeting.index(b">") + 1]
            line = b"APOP %s %s\r\n" % (user.encode(), hashlib.md5(stamp + secret.encode()).hexdigest().encode())
        else:
            sock.sendall(b"USER %s\r\n" % user.encode())
            assert reader.readline() == b"+OK\r\n"
            line = b"PASS %s\r\n" % secret.encode()
        started = time.monotonic()
        sock.sendall(line)
        answer = reader.readline()
        return time.monotonic() - started, answer


def test_unknown_users_and_wrong_passwords_of_every_hash_kind_take_the_same_time(tmp_path: Path) -> None:
    passwd = tmp_path / "users.passwd"
    users = _passwd(passwd)
    # what the hashes cost here: the answers must differ by far less than that
    entries = {line.split(":")[0]: line.strip().split(":", 1)[1] for line in passwd.read_text().splitlines()}
    started = time.monotonic()
    verify_password(PasswdEntry("bcrypt", BLF_CRYPT, entries["bcrypt"].split("}", 1)[1]), b"wrong")
    bcrypt_cost = time.monotonic() - started
    server = Pop3ShieldServer(passwd_file=passwd, auth_toml="allow_plaintext = true",
                              server_toml=f"apop = true\nauth_failure_delay = {DEADLINE}\n"
                                          f"auth_failure_delay_max = {DEADLINE}\nauth_unchecked_address = 0\n"
                                          "auth_unchecked_user = 0\nauth_unchecked_pair = 0\n"
                                          "max_connections_per_ip = 100\nhash_threads = 8")
    host, port = server.start(tmp_path / "srv", users, tmp_path / "mail")
    try:
        kinds = [("unknown", "nobody", False), ("plain", "plain", False), ("argon", "argon", False),
                 ("bcrypt", "bcrypt", False), ("apop-plain", "plain", True), ("apop-bcrypt", "bcrypt", True),
                 ("apop-unknown", "nobody", True)]
        answers = []
        with ThreadPoolExecutor(max_workers=len(kinds)) as pool:
            for _ in range(3):  # three rounds of every kind at once
                answers += list(pool.map(
                    lambda job: (job[0], *_timed_failure(host, port, job[1], "wrong-pw", job[2])), kinds))
        for kind, user, secret in (("plain", "plain", users["plain"]), ("bcrypt", "bcrypt", users["bcrypt"])):
            with socket.create_connection((host, port), timeout=30) as sock:  # right passwords still work
                reader = sock.makefile("rb")
                reader.readline()
                sock.sendall(b"USER %s\r\nPASS %s\r\nQUIT\r\n" % (user.encode(), secret.encode()))
                assert reader.readline() == b"+OK\r\n"
                assert reader.readline().startswith(b"+OK Logged in"), kind
    finally:
        server.stop()
    assert {answer for _, _, answer in answers} == {FAILED}, answers
    times: dict[str, list[float]] = {}
    for kind, seconds, _ in answers:
        times.setdefault(kind, []).append(seconds)
    # every failure at the deadline (a loaded machine may add some, never take any away) ...
    assert min(min(t) for t in times.values()) >= DEADLINE - 0.02, times
    # ... so the kinds are alike: unknown user vs the costliest hash differ by far less than that hash
    medians = {kind: statistics.median(t) for kind, t in times.items()}
    spread = max(medians.values()) - min(medians.values())
    assert spread < max(0.1, bcrypt_cost / 2), (spread, bcrypt_cost, medians)


def test_without_a_failure_delay_passwords_are_always_checked(mailroot: Path) -> None:
    """auth_failure_delay = 0 turns the brake off, the unchecked penalty with it."""
    clock = Clock()
    factory = make_factory(mailroot, clock, auth_failure_delay=0.0, auth_failure_delay_max=0.0,
                           auth_penalty_thresholds=(1, 1, 1))
    proto, transport = connect(factory)
    take(transport)
    for _ in range(3):
        proto.dataReceived(b"USER alice\r\nPASS typo\r\n")
        clock.advance(0)
        assert take(transport) == b"+OK\r\n" + FAILED
    proto.dataReceived(b"USER alice\r\nPASS secret-pw\r\n")
    assert take(transport).endswith(b"+OK Logged in, 2 messages (58 octets).\r\n")
