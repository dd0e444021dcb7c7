"""The realm's maildrop on real directories: sizes kept across logins, symlinks refused.

Reads are counted on the one path that opens message files (``Maildir._open_regular``), so
"the second login reads nothing" is a number, not a timing. The symlink cases also run against
a real server, where the login must get ``-ERR [SYS/TEMP]`` and the foreign files stay unread.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pop3shield.core.dotstuff import wire_size
from pop3shield.maildir import MailboxError, Maildir, MessageChanged, SizeCache
from pop3shield.realm import IMaildrop, MaildirRealm
from tests.support.pop3shield_server import Pop3ShieldServer
from tests.support.raw import PASSWORD, Client

BODY = b"Subject: s\n\nline one\n.dot line\n"


class ReadCounter:
    """Counts message files opened by the Maildir code, by key."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.keys: list[str] = []
        original = Maildir._open_regular

        def counting(store: Maildir, key: str):  # type: ignore[no-untyped-def]
            self.keys.append(key)
            return original(store, key)

        monkeypatch.setattr(Maildir, "_open_regular", counting)

    def take(self) -> list[str]:
        keys, self.keys = self.keys, []
        return keys


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> ReadCounter:
    return ReadCounter(monkeypatch)


@pytest.fixture
def mailroot(tmp_path: Path) -> Path:
    root = tmp_path / "mail"
    for sub in ("cur", "new", "tmp"):
        (root / "alice" / "Maildir" / sub).mkdir(parents=True)
    return root


def login(root: Path, user: str = "alice"):
    """What the server does per login: a fresh avatar from the realm, then open() (lock + scan)."""
    realm = MaildirRealm(str(root / "{user}" / "Maildir"))
    _, drop, logout = realm.requestAvatar(user, None, IMaildrop)
    entries = drop.open()
    return drop, entries, logout


def put(root: Path, key: str, data: bytes = BODY, user: str = "alice") -> Path:
    path = root / user / "Maildir" / key
    path.write_bytes(data)
    return path


# -- sizes across logins ------------------------------------------------------------


def test_second_login_to_unchanged_mailbox_reads_no_message(mailroot: Path, reads: ReadCounter) -> None:
    keys = [f"cur/{1700000000 + n}.M{n}P1.h:2,S" for n in range(50)]
    for n, key in enumerate(keys):
        put(mailroot, key, BODY + b"x" * n + b"\n")
    drop, first, logout = login(mailroot)
    assert sorted(reads.take()) == sorted(keys)  # the first login had to read them all
    assert [m.size for m in first] == [wire_size(BODY + b"x" * n + b"\n") for n in range(50)]
    logout()
    drop, second, logout = login(mailroot)
    assert reads.take() == []
    assert second == first
    logout()


def test_changed_file_is_read_again(mailroot: Path, reads: ReadCounter) -> None:
    put(mailroot, "cur/1700000000.M1P1.h:2,S")
    changed = put(mailroot, "cur/1700000001.M2P1.h:2,S")
    drop, _, logout = login(mailroot)
    logout()
    reads.take()
    changed.write_bytes(b"Subject: now longer\n\nand\nmore\nlines\n")
    os.utime(changed, ns=(1, 1))  # whatever the clock did: mtime differs
    drop, entries, logout = login(mailroot)
    assert reads.take() == ["cur/1700000001.M2P1.h:2,S"]
    assert entries[1].size == wire_size(b"Subject: now longer\n\nand\nmore\nlines\n")
    logout()


def test_replaced_file_with_same_size_and_mtime_is_read_again(mailroot: Path, reads: ReadCounter) -> None:
    path = put(mailroot, "cur/1700000000.M1P1.h:2,S", b"aaaa\n")
    st = path.stat()
    drop, _, logout = login(mailroot)
    logout()
    reads.take()
    other = path.with_name("other")
    other.write_bytes(b"b\nc\n")  # same length, other wire size (two bare LFs)
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(other, path)  # a new inode under the old name
    drop, entries, logout = login(mailroot)
    assert reads.take() == ["cur/1700000000.M1P1.h:2,S"]
    assert entries[0].size == wire_size(b"b\nc\n")
    logout()


def test_w_size_in_name_is_used_without_reading(mailroot: Path, reads: ReadCounter) -> None:
    data = b"Subject: w\n\nbody\n"
    key = f"cur/1700000000.M1P1.h,S={len(data)},W={wire_size(data)}:2,S"
    put(mailroot, key, data)
    w_only = f"new/1700000001.M2P1.h,W={wire_size(data)}"
    put(mailroot, w_only, data)
    drop, entries, logout = login(mailroot)
    assert reads.take() == []
    assert [(m.key, m.size) for m in entries] == [(key, wire_size(data)), (w_only, wire_size(data))]
    with drop.open_message(key) as fh:  # RETR reads it, of course
        assert fh.read() == data
    logout()


@pytest.mark.parametrize(
    "fields",
    [
        ",S=18",  # S alone: the number of bare LFs is unknown
        ",W=3",  # W smaller than the file: impossible
        ",W=1000",  # more than twice the file: impossible
        ",S=99,W=20",  # S contradicts the file, so W is not trusted either
        ",W=20x",  # not a number up to the next field
    ],
)
def test_untrustworthy_size_in_name_is_read(mailroot: Path, reads: ReadCounter, fields: str) -> None:
    data = b"Subject: w\n\nbody\n"  # 17 octets, wire size 20
    key = f"cur/1700000000.M1P1.h{fields}:2,S"
    put(mailroot, key, data)
    drop, entries, logout = login(mailroot)
    assert reads.take() == [key]
    assert entries[0].size == wire_size(data) == 20
    logout()


def test_w_name_without_final_newline_is_refused_once_then_corrected(mailroot: Path, reads: ReadCounter) -> None:
    data = b"Subject: w\n\nno final newline"
    name_size = len(data.replace(b"\n", b"\r\n"))  # what an MDA writes: CRLF size, no final CRLF
    key = f"cur/1700000000.M1P1.h,W={name_size}:2,S"
    put(mailroot, key, data)
    drop, entries, logout = login(mailroot)
    assert entries[0].size == name_size
    with pytest.raises(MessageChanged):  # RETR would send 2 octets more than promised
        drop.open_message(key)
    logout()
    reads.take()
    drop, entries, logout = login(mailroot)
    assert reads.take() == []
    assert entries[0].size == wire_size(data) == name_size + 2
    with drop.open_message(key) as fh:
        assert fh.read() == data
    logout()


def test_open_message_refuses_a_file_changed_since_the_scan(mailroot: Path) -> None:
    path = put(mailroot, "cur/1700000000.M1P1.h:2,S", b"short\n")
    drop, entries, logout = login(mailroot)
    path.write_bytes(b"a much longer body now\n")
    with pytest.raises(MessageChanged):
        drop.open_message(entries[0].key)
    path.write_bytes(b"short\n")
    os.utime(path, ns=(1, 1))
    with pytest.raises(MessageChanged):  # same size, but not the file that was measured
        drop.open_message(entries[0].key)
    logout()


def test_open_message_follows_a_move_to_cur_and_a_flag_change(mailroot: Path) -> None:
    put(mailroot, "new/1700000000.M1P1.h")
    drop, (entry,), logout = login(mailroot)
    base = mailroot / "alice" / "Maildir"
    os.rename(base / entry.key, base / "cur/1700000000.M1P1.h:2,S")
    with drop.open_message(entry.key) as fh:  # rename keeps the inode, size and mtime
        assert fh.read() == BODY
    logout()


def test_size_cache_is_bounded_and_least_recently_used_goes_first() -> None:
    identity = (1, 1, 1)
    cache = SizeCache(max_entries=4)
    cache.store("/a", {"cur/1": (identity, 1), "cur/2": (identity, 2)})
    cache.store("/b", {"cur/1": (identity, 1)})
    assert cache.mailbox("/a")["cur/2"] == (identity, 2)  # /a is now the most recent
    cache.store("/c", {"cur/1": (identity, 1), "cur/2": (identity, 2)})
    assert len(cache) == 4
    assert cache.mailbox("/b") == {}  # evicted: least recently used
    assert len(cache.mailbox("/a")) == 2 and len(cache.mailbox("/c")) == 2
    cache.store("/d", {f"cur/{n}": (identity, n) for n in range(10)})
    assert len(cache) == 4 and len(cache.mailbox("/d")) == 4
    cache.update("/d", "cur/0", (2, 2, 2), 7)
    assert cache.mailbox("/d")["cur/0"] == ((2, 2, 2), 7) and len(cache) == 4


# -- symlinks below the mail root ---------------------------------------------------------


def foreign(tmp_path: Path) -> Path:
    """A directory outside the mail root that looks like a Maildir with a secret 'message'."""
    outside = tmp_path / "outside"
    for sub in ("cur", "new", "tmp"):
        (outside / "Maildir" / sub).mkdir(parents=True, exist_ok=True)
        (outside / sub).mkdir(exist_ok=True)
    for where in ("Maildir/cur", "Maildir/new", "cur", "new"):
        (outside / where / "1700000000.M1P1.secret").write_bytes(b"Subject: secret\n\nshadow\n")
    return outside


def make_layout(root: Path, user: str, case: str, outside: Path) -> None:
    """One user's directory in one of the layouts; cases other than 'legit' link outside."""
    home = root / user
    maildir = home / "Maildir"
    if case == "user-dir":
        shutil.rmtree(home, ignore_errors=True)
        os.symlink(outside, home)
        return
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    if case == "maildir":
        shutil.rmtree(maildir)
        os.symlink(outside / "Maildir", maildir)
    elif case in ("cur", "new"):
        os.rmdir(maildir / case)
        os.symlink(outside / case, maildir / case)
    else:
        assert case == "legit"
        (maildir / "cur" / "1700000000.M1P1.mine:2,S").write_bytes(b"Subject: mine\n\nhello\n")


SYMLINK_CASES = ["maildir", "cur", "new", "user-dir"]


@pytest.mark.parametrize("case", SYMLINK_CASES)
def test_symlink_below_the_root_refuses_the_mailbox(tmp_path: Path, case: str, reads: ReadCounter) -> None:
    root = tmp_path / "mail"
    root.mkdir()
    outside = foreign(tmp_path)
    before = sorted(p.relative_to(outside) for p in outside.rglob("*"))
    make_layout(root, "alice", case, outside)
    with pytest.raises(MailboxError, match="symbolic link"):
        login(root)
    assert reads.take() == []
    assert sorted(p.relative_to(outside) for p in outside.rglob("*")) == before  # nothing created there


def test_symlinked_user_dir_without_maildir_creates_nothing_outside(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    root.mkdir()
    target = tmp_path / "etc"
    target.mkdir()
    os.symlink(target, root / "alice")
    with pytest.raises(MailboxError, match="symbolic link"):
        login(root)
    assert list(target.iterdir()) == []


def test_swapping_cur_for_a_symlink_after_login_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    make_layout(root, "alice", "legit", tmp_path)
    outside = foreign(tmp_path)
    drop, entries, logout = login(root)
    maildir = root / "alice" / "Maildir"
    os.rename(maildir / "cur", maildir / "cur.old")
    os.symlink(outside / "cur", maildir / "cur")
    rescanned = drop._opened().scan()  # the handle taken at login still points at the real cur/
    assert [m.key for m in rescanned] == [m.key for m in entries] == ["cur/1700000000.M1P1.mine:2,S"]
    with drop.open_message(entries[0].key) as fh:
        assert fh.read() == b"Subject: mine\n\nhello\n"
    logout()


def test_symlinked_mail_root_itself_is_trusted(tmp_path: Path) -> None:
    real = tmp_path / "spool"
    make_layout(real, "alice", "legit", tmp_path)
    os.symlink(real, tmp_path / "mail")  # like /var/mail -> /var/spool/mail
    drop, entries, logout = login(tmp_path / "mail")
    assert [m.key for m in entries] == ["cur/1700000000.M1P1.mine:2,S"]
    logout()


def test_first_login_creates_the_maildir_under_an_existing_user_dir(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    (root / "alice").mkdir(parents=True)
    drop, entries, logout = login(root)
    assert entries == []
    for sub in ("cur", "new", "tmp"):
        assert (root / "alice" / "Maildir" / sub).is_dir()
    assert (root / "alice" / "Maildir").stat().st_mode & 0o777 == 0o700
    logout()
    with pytest.raises(MailboxError):  # no user directory: nothing is made up
        login(root, "bob")
    assert not (root / "bob").exists()


USERS = {"alice": "legit", "bob": "maildir", "carol": "cur", "dave": "new", "erin": "user-dir"}


@pytest.fixture(scope="module")
def linked_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pop3ShieldServer]:
    tmp = tmp_path_factory.mktemp("links")
    server = Pop3ShieldServer(server_toml="auth_failure_delay = 0.0\nauth_failure_delay_max = 0.0")
    server.start(tmp / "run", {user: PASSWORD for user in USERS}, tmp / "mail")
    outside = foreign(tmp)
    for user, case in USERS.items():
        make_layout(tmp / "mail", user, case, outside)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("user", [u for u, case in USERS.items() if case != "legit"])
def test_server_refuses_symlinked_mailbox_with_sys_temp(linked_server: Pop3ShieldServer, user: str) -> None:
    client = Client(linked_server)
    client.send(f"USER {user}\r\nPASS {PASSWORD}\r\n".encode())
    assert client.line() == b"+OK\r\n"
    assert client.line() == b"-ERR [SYS/TEMP] Temporary server problem, try again later.\r\n"
    client.send(b"STAT\r\n")  # still not logged in: nothing of the foreign files is listed
    assert client.line().startswith(b"-ERR")
    client.close()
    mailbox = str(linked_server.maildir_root / user / "Maildir")
    for _ in range(50):  # the log line may land a moment after the reply
        log = linked_server.log_path.read_text(encoding="utf-8", errors="replace")
        if any(mailbox in line and "symbolic link" in line for line in log.splitlines()):
            break
        time.sleep(0.1)
    assert any(mailbox in line and "symbolic link" in line for line in log.splitlines()), log[-2000:]


def test_server_serves_a_legitimate_layout(linked_server: Pop3ShieldServer) -> None:
    client = Client(linked_server)
    client.login("alice")
    client.send(b"RETR 1\r\n")
    assert client.line() == b"+OK 24 octets\r\n"
    assert client.read(27) == b"Subject: mine\r\n\r\nhello\r\n.\r\n"
    client.send(b"QUIT\r\n")
    assert client.line() == b"+OK Logging out.\r\n"
    client.close()
