"""Issue 10: hashing and mailbox I/O have separate thread pools, so a login flood cannot starve RETR.

A real server with one hashing thread and bcrypt entries of a real cost: twenty concurrent
wrong passwords queue seconds of hashing, and a session that logged in before reads a message
meanwhile in a fraction of that.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from pop3shield.config import parse_config
from pop3shield.passwd import BLF_CRYPT, PasswdEntry, hash_password, verify_password
from tests.support.pop3shield_server import Pop3ShieldServer

FLOOD = 20
BODY = b"Subject: hello\r\n\r\n" + b"x" * 70 + b"\r\n"


def test_hash_threads_is_a_config_key() -> None:
    config = parse_config({"server": {"hash_threads": 2}, "auth": {"realm": "a:b"}}, "p.toml", ".")
    assert config.server.hash_threads == 2


def test_untrusted_hash_threads_default_to_half_the_process_share_of_the_cores(monkeypatch) -> None:
    from pop3shield.config import ConfigError
    from pop3shield.service import untrusted_hash_threads

    monkeypatch.setattr("os.cpu_count", lambda: 4)
    config = parse_config({"server": {"workers": 2}, "auth": {"realm": "a:b"}}, "p.toml", ".")
    assert config.server.hash_threads_untrusted == 0
    assert untrusted_hash_threads(config, workers=True) == 1  # half of 4 cores over 2 workers
    assert untrusted_hash_threads(config, workers=False) == 2  # one process (twistd)
    config = parse_config({"server": {"workers": 8}, "auth": {"realm": "a:b"}}, "p.toml", ".")
    assert untrusted_hash_threads(config, workers=True) == 1
    config = parse_config({"server": {"hash_threads_untrusted": 3}, "auth": {"realm": "a:b"}}, "p.toml", ".")
    assert untrusted_hash_threads(config, workers=True) == 3
    try:
        parse_config({"server": {"hash_threads_untrusted": -1}, "auth": {"realm": "a:b"}}, "p.toml", ".")
    except ConfigError as exc:
        assert "hash_threads_untrusted" in str(exc)
    else:
        raise AssertionError("a negative thread count was accepted")


def test_retr_goes_on_while_the_hash_pool_is_saturated(tmp_path: Path) -> None:
    passwd = tmp_path / "users.passwd"
    hashed = hash_password("reader-secret", BLF_CRYPT)
    passwd.write_text(f"reader:{hashed}\nvictim:{hash_password('victim-secret', BLF_CRYPT)}\n", encoding="utf-8")
    passwd.chmod(0o600)
    started = time.monotonic()
    verify_password(PasswdEntry("reader", BLF_CRYPT, hashed.split("}", 1)[1]), b"wrong")
    cost = time.monotonic() - started
    server = Pop3ShieldServer(passwd_file=passwd,
                              server_toml="hash_threads = 1\nthread_pool_size = 2\nauth_failure_delay = 0\n"
                                          "auth_unchecked_address = 0\nauth_unchecked_user = 0\n"
                                          "auth_unchecked_pair = 0\nmax_connections_per_ip = 100")
    host, port = server.start(tmp_path / "srv", {"reader": "", "victim": ""}, tmp_path / "mail")
    (tmp_path / "mail" / "reader" / "Maildir" / "new" / "1700000000.M1P1.test").write_bytes(BODY)
    answered: list[float] = []
    try:
        reader = socket.create_connection((host, port), timeout=60)
        lines = reader.makefile("rb")
        lines.readline()
        reader.sendall(b"USER reader\r\nPASS reader-secret\r\n")
        assert lines.readline() == b"+OK\r\n"
        assert lines.readline().startswith(b"+OK Logged in"), server.diagnostics()

        def guess() -> None:
            with socket.create_connection((host, port), timeout=120) as sock:
                r = sock.makefile("rb")
                r.readline()
                sock.sendall(b"USER victim\r\nPASS wrong\r\n")
                r.readline()
                r.readline()
                answered.append(time.monotonic())
        flood = [threading.Thread(target=guess, daemon=True) for _ in range(FLOOD)]
        flood_start = time.monotonic()
        for thread in flood:
            thread.start()
        time.sleep(min(1.0, cost * 3))  # the guesses are in, one thread hashes them one by one
        retr_start = time.monotonic()
        reader.sendall(b"RETR 1\r\n")
        assert lines.readline().startswith(b"+OK")
        body = b""
        while not body.endswith(b"\r\n.\r\n"):
            chunk = lines.readline()
            assert chunk, server.diagnostics()
            body += chunk
        retr_done = time.monotonic()
        reader.sendall(b"QUIT\r\n")
        reader.close()
        for thread in flood:
            thread.join(120)
    finally:
        server.stop()
    assert body == BODY + b".\r\n"
    assert len(answered) == FLOOD
    # the flood needs about FLOOD x cost of hashing on its one thread; the RETR did not wait for it
    assert max(answered) - flood_start > FLOOD * cost * 0.3, (answered, cost)
    assert sum(1 for t in answered if t > retr_done) >= FLOOD // 3, (retr_done, answered)
    assert retr_done - retr_start < FLOOD * cost / 4, (retr_done - retr_start, cost)


def test_a_known_user_is_hashed_before_a_flood_from_fresh_addresses_on_every_worker(tmp_path: Path) -> None:
    """brute-many: each fresh address's first guess is clean and may be hashed, but only on the
    low-priority untrusted threads; a user who logged in from its address before goes first,
    whichever worker takes its connection (the supervisor's state remembers the pair)."""
    passwd = tmp_path / "users.passwd"
    passwd.write_text(f"known:{hash_password('known-secret', BLF_CRYPT)}\n"
                      f"victim:{hash_password('victim-secret', BLF_CRYPT)}\n", encoding="utf-8")
    passwd.chmod(0o600)
    server = Pop3ShieldServer(passwd_file=passwd, workers=2,
                              server_toml="hash_threads = 2\nhash_threads_untrusted = 1\nauth_failure_delay = 0\n"
                                          "auth_unchecked_address = 0\nauth_unchecked_user = 0\n"
                                          "auth_unchecked_pair = 0")
    host, port = server.start(tmp_path / "srv", {"known": "", "victim": ""}, tmp_path / "mail")
    answered: list[float] = []
    logins: list[float] = []

    def login(address: str, user: str, password: str) -> bytes:
        with socket.create_connection((host, port), timeout=120, source_address=(address, 0)) as sock:
            r = sock.makefile("rb")
            r.readline()
            sock.sendall(f"USER {user}\r\nPASS {password}\r\n".encode())
            r.readline()
            reply = r.readline()
            sock.sendall(b"QUIT\r\n")
            return reply

    def guess(n: int) -> None:
        assert login(f"127.0.3.{n + 1}", "victim", "wrong").startswith(b"-ERR [AUTH]")
        answered.append(time.monotonic())
    try:
        assert login("127.0.0.1", "known", "known-secret").startswith(b"+OK"), server.diagnostics()
        flood = [threading.Thread(target=guess, args=(n,), daemon=True) for n in range(FLOOD)]
        for thread in flood:
            thread.start()
        time.sleep(0.5)  # the guesses are queued for the two low-priority threads (one a worker)
        for _ in range(4):  # on either worker: known to both through the supervisor
            assert login("127.0.0.1", "known", "known-secret").startswith(b"+OK"), server.diagnostics()
            logins.append(time.monotonic())
        for thread in flood:
            thread.join(120)
    finally:
        server.stop()
    assert len(answered) == FLOOD
    # ordering, not timing: every known login came while most of the flood still waited for its hash
    for done in logins:
        assert sum(1 for t in answered if t > done) >= FLOOD // 3, (logins, sorted(answered))
