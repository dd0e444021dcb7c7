"""Tests for the synchronous Maildir store, on real temporary directories."""

from __future__ import annotations

import dataclasses
import gc
import os
import stat
import threading
from pathlib import Path

import pytest

from pop3shield.core.dotstuff import DotStuffer, stuff, unstuff
from pop3shield.maildir import LOCK_NAME, MailboxError, MailboxInUse, Maildir, MessageInfo


@pytest.fixture
def md(tmp_path: Path) -> Maildir:
    return Maildir(tmp_path / "Maildir", create=True)


def put(md: Maildir, key: str, data: bytes = b"Subject: x\n\nbody\n") -> str:
    Path(md.path, key).write_bytes(data)
    return key


def retr(md: Maildir, key: str) -> bytes:
    """What a client gets for RETR, after unstuffing (read in tiny chunks on purpose)."""
    enc = DotStuffer()
    out = []
    with md.open_message(key) as fh:
        while chunk := fh.read(7):
            out.append(enc.feed(chunk))
    out.append(enc.finish())
    return unstuff(b"".join(out))


def is_valid_uid(uid: str) -> bool:
    return 1 <= len(uid) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in uid)


# -- layout --------------------------------------------------------------------


def test_create_layout_mode(tmp_path: Path) -> None:
    md = Maildir(tmp_path / "a" / "b", create=True)
    for sub in ("cur", "new", "tmp"):
        mode = os.stat(os.path.join(md.path, sub)).st_mode
        assert stat.S_ISDIR(mode) and stat.S_IMODE(mode) == 0o700
    assert md.scan() == []
    Maildir(md.path, create=True)  # idempotent on an existing maildir


def test_missing_maildir_is_mailbox_error(tmp_path: Path) -> None:
    with pytest.raises(MailboxError):
        Maildir(tmp_path / "nope")
    (tmp_path / "half" / "cur").mkdir(parents=True)
    with pytest.raises(MailboxError):
        Maildir(tmp_path / "half")


def test_scan_after_maildir_removed_is_mailbox_error(md: Maildir) -> None:
    os.rmdir(os.path.join(md.path, "new"))
    with pytest.raises(MailboxError):
        md.scan()


def test_message_info_is_frozen() -> None:
    info = MessageInfo(key="new/a", uid="a", size=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.size = 2  # type: ignore[misc]


# -- scan order, UIDs --------------------------------------------------------


def test_scan_orders_by_delivery_time_then_name(md: Maildir) -> None:
    put(md, "cur/1700000002.M1P1.host:2,S")
    put(md, "new/1700000001.M2P1.host")
    put(md, "new/1700000003.M1P1.host")
    put(md, "cur/1700000001.M1P1.host:2,")
    put(md, "new/900000000.M1P1.host")  # fewer digits: earlier time, not earlier string
    keys = [m.key for m in md.scan()]
    assert keys == [
        "new/900000000.M1P1.host",
        "cur/1700000001.M1P1.host:2,",
        "new/1700000001.M2P1.host",
        "cur/1700000002.M1P1.host:2,S",
        "new/1700000003.M1P1.host",
    ]
    assert [m.uid for m in md.scan()] == [k.split("/")[1].split(":")[0] for k in keys]
    assert Maildir(md.path).scan() == md.scan()  # same in a new session


def test_odd_names_fall_back_to_mtime_for_order(md: Maildir) -> None:
    put(md, "new/zzz")
    put(md, "new/aaa")
    os.utime(os.path.join(md.path, "new/zzz"), (1000, 1000))
    os.utime(os.path.join(md.path, "new/aaa"), (2000, 2000))
    assert [m.key for m in md.scan()] == ["new/zzz", "new/aaa"]


def test_uid_stable_across_move_and_flags(md: Maildir) -> None:
    key = md.deliver(b"Subject: hi\n\nbody\n")
    (before,) = md.scan()
    name = key.split("/", 1)[1]
    os.rename(os.path.join(md.path, key), os.path.join(md.path, "cur", name + ":2,"))
    (moved,) = md.scan()
    os.rename(
        os.path.join(md.path, "cur", name + ":2,"), os.path.join(md.path, "cur", name + ":2,RS")
    )
    (flagged,) = Maildir(md.path).scan()
    assert before.uid == moved.uid == flagged.uid == name
    assert flagged.key == f"cur/{name}:2,RS"
    assert before.size == moved.size == flagged.size


@pytest.mark.parametrize(
    "name",
    [
        "x" * 71,
        "x" * 250,
        "with space",
        "tab\there",
        "caf\u00e9",
        "\x7f.del",
        ":2,S",  # empty unique name
        "~" + "0" * 40,  # looks like a hashed UID
        "bad\udcff\udcfe",  # undecodable bytes from the file system
    ],
)
def test_odd_names_get_valid_stable_uids(md: Maildir, name: str) -> None:
    try:
        put(md, "new/" + name)
    except (UnicodeEncodeError, OSError):
        pytest.skip("file system does not accept this name")
    (info,) = md.scan()
    assert is_valid_uid(info.uid)
    assert info.uid != name
    assert info.uid.startswith("~")
    assert Maildir(md.path).scan()[0].uid == info.uid
    assert retr(md, info.key) == b"Subject: x\r\n\r\nbody\r\n"


def test_plain_name_of_70_chars_is_used_as_is(md: Maildir) -> None:
    name = "1700000000." + "a" * 59
    put(md, "new/" + name + ":2,S")
    (info,) = md.scan()
    assert info.uid == name and len(name) == 70


def test_uids_unique(md: Maildir) -> None:
    for i in range(20):
        md.deliver(b"m%d\n" % i)
    put(md, "new/" + "y" * 100)
    put(md, "new/" + "y" * 101)
    uids = [m.uid for m in md.scan()]
    assert len(uids) == len(set(uids)) == 22
    assert all(is_valid_uid(u) for u in uids)


def test_same_unique_name_in_new_and_cur_listed_once(md: Maildir) -> None:
    put(md, "new/1700000000.M1P1.h")
    put(md, "cur/1700000000.M1P1.h:2,S")
    (info,) = md.scan()
    assert info.key == "cur/1700000000.M1P1.h:2,S"


# -- what scan ignores ------------------------------------------------------


def test_scan_ignores_tmp_dotfiles_dirs_symlinks_fifos(md: Maildir, tmp_path: Path) -> None:
    put(md, "tmp/1700000000.M1P1.h")
    put(md, "new/.hidden")
    put(md, "cur/.1700000000.M1P1.h:2,")
    os.mkdir(os.path.join(md.path, "cur", "subfolder"))
    put(md, "cur/subfolder/1700000000.M2P1.h")
    outside = tmp_path / "secret"
    outside.write_bytes(b"secret\n")
    os.symlink(outside, os.path.join(md.path, "new", "1700000000.M3P1.h"))
    real = put(md, "cur/1700000000.M4P1.h:2,")
    os.symlink(os.path.join(md.path, real), os.path.join(md.path, "new", "1700000000.M5P1.h"))
    os.mkfifo(os.path.join(md.path, "new", "1700000000.M6P1.h"))
    assert [m.key for m in md.scan()] == [real]


def test_lock_file_is_not_a_message(md: Maildir) -> None:
    md.lock()
    try:
        assert md.scan() == []
        assert os.path.exists(os.path.join(md.path, LOCK_NAME))
    finally:
        md.unlock()


# -- sizes -----------------------------------------------------------------

CONTENTS = [
    b"",
    b"Subject: lf\n\nline\n.dot\n..two\n.\n",
    b"Subject: crlf\r\n\r\nline\r\n.dot\r\n.\r\n",
    b"mixed\r\nlf\nend",
    b"no final newline",
    b"lone\rcr\r",
    b"\n\n\n",
    b"x" * 200_000 + b"\r",  # CR at a 64 KiB read boundary region
    (b"a" * 65535 + b"\r\n.") * 3,  # CRLF split across the 64 KiB reads
]


@pytest.mark.parametrize("content", CONTENTS)
def test_size_is_retr_octet_count(md: Maildir, content: bytes) -> None:
    key = put(md, "new/1700000000.M1P1.h", content)
    (info,) = md.scan()
    assert info.key == key
    assert info.size == len(unstuff(stuff(content)))
    assert info.size == len(retr(md, key))
    assert retr(md, key) == unstuff(stuff(content))


def test_size_cache_notices_changed_file(md: Maildir) -> None:
    key = put(md, "new/1700000000.M1P1.h", b"short\n")
    assert md.scan()[0].size == 7
    assert md.scan()[0].size == 7
    path = os.path.join(md.path, key)
    Path(path).write_bytes(b"much longer\n")
    os.utime(path, ns=(1, 1))
    assert md.scan()[0].size == 13


# -- locking -----------------------------------------------------------------


def test_lock_waits_for_a_lock_released_meanwhile(md: Maildir) -> None:
    """A client that reconnects at once must not find the lock its old connection still held."""
    import time

    other = Maildir(md.path)
    other.lock()
    timer = threading.Timer(0.2, other.unlock)
    timer.start()
    try:
        started = time.monotonic()
        md.lock(wait=2.0)
        assert 0.15 < time.monotonic() - started < 1.5
    finally:
        timer.cancel()
        md.unlock()


def test_lock_wait_gives_up_when_the_lock_stays_held(md: Maildir) -> None:
    import time

    other = Maildir(md.path)
    other.lock()
    try:
        started = time.monotonic()
        with pytest.raises(MailboxInUse):
            md.lock(wait=0.3)
        assert time.monotonic() - started >= 0.3
    finally:
        other.unlock()
    md.lock(wait=0.3)  # the lock file it opened while waiting was closed: a fresh try works
    md.unlock()


def test_lock_conflicts_between_instances_in_one_process(md: Maildir) -> None:
    other = Maildir(md.path)
    md.lock()
    md.lock()  # already held by this instance: no-op
    with pytest.raises(MailboxInUse):
        other.lock()
    md.unlock()
    md.unlock()  # idempotent
    other.lock()
    with pytest.raises(MailboxInUse):
        md.lock()
    other.unlock()
    md.lock()
    md.unlock()


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_lock_released_when_instance_is_collected(md: Maildir) -> None:
    holder = Maildir(md.path)
    holder.lock()
    del holder
    gc.collect()
    md.lock()
    md.unlock()


def test_lock_file_symlink_refused(md: Maildir, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    os.symlink(target, os.path.join(md.path, LOCK_NAME))
    with pytest.raises(MailboxError):
        md.lock()
    assert not target.exists()


def test_lock_conflicts_across_processes(md: Maildir) -> None:
    md.lock()
    try:
        pid = os.fork()
        if pid == 0:  # child: must see the lock as held
            code = 1
            try:
                Maildir(md.path).lock()
            except MailboxInUse:
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        md.unlock()


# -- open_message / key validation -------------------------------------------

BAD_KEYS = [
    "",
    "new",
    "new/",
    "tmp/x",
    "../x",
    "/etc/passwd",
    "new/../../etc/passwd",
    "new/..",
    "new/.",
    "cur/a/b",
    "new//x",
    "new/.hidden",
    "new/x\0y",
    "New/x",
    "./new/x",
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_open_message_rejects_bad_keys(md: Maildir, key: str) -> None:
    with pytest.raises(ValueError):
        md.open_message(key)


@pytest.mark.parametrize("key", BAD_KEYS)
def test_delete_rejects_bad_keys_before_deleting_anything(md: Maildir, key: str) -> None:
    good = put(md, "cur/1700000000.M1P1.h:2,")
    with pytest.raises(ValueError):
        md.delete([good, key])
    assert os.path.exists(os.path.join(md.path, good))


def test_open_message_refuses_symlink_and_fifo(md: Maildir, tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.write_bytes(b"secret\n")
    os.symlink(outside, os.path.join(md.path, "new", "link"))
    with pytest.raises(OSError):
        md.open_message("new/link")
    os.mkfifo(os.path.join(md.path, "new", "fifo"))
    with pytest.raises(MailboxError):  # and must not block
        md.open_message("new/fifo")


def test_open_message_follows_move_to_cur(md: Maildir) -> None:
    key = md.deliver(b"hello\n")
    name = key.split("/", 1)[1]
    os.rename(os.path.join(md.path, key), os.path.join(md.path, "cur", name + ":2,S"))
    with md.open_message(key) as fh:
        assert fh.read() == b"hello\n"


def test_open_message_missing(md: Maildir) -> None:
    with pytest.raises(FileNotFoundError):
        md.open_message("cur/1700000000.M1P1.h:2,")


# -- delete -------------------------------------------------------------------


def test_delete_only_marked(md: Maildir) -> None:
    keys = [md.deliver(b"m%d\n" % i) for i in range(4)]
    put(md, "cur/1700000000.M9P9.h:2,S")
    assert md.delete([keys[0], keys[2], "cur/1700000000.M9P9.h:2,S"]) == []
    assert [m.key for m in md.scan()] == [keys[1], keys[3]]


def test_delete_tolerates_vanished_file(md: Maildir) -> None:
    a, b = md.deliver(b"a\n"), md.deliver(b"b\n")
    os.unlink(os.path.join(md.path, a))
    assert md.delete([a, b]) == []
    assert md.scan() == []


def test_delete_follows_move_to_cur(md: Maildir) -> None:
    key = md.deliver(b"a\n")
    keep = md.deliver(b"b\n")
    name = key.split("/", 1)[1]
    os.rename(os.path.join(md.path, key), os.path.join(md.path, "cur", name + ":2,S"))
    assert md.delete([key]) == []
    assert [m.key for m in md.scan()] == [keep]


def test_delete_reports_failures(md: Maildir) -> None:
    good = md.deliver(b"a\n")
    os.mkdir(os.path.join(md.path, "cur", "notafile"))  # unlink() fails on a directory
    assert md.delete([good, "cur/notafile"]) == ["cur/notafile"]
    assert md.scan() == []


def test_delete_empty(md: Maildir) -> None:
    assert md.delete([]) == []


# -- deliver ----------------------------------------------------------------


def test_deliver_round_trip(md: Maildir) -> None:
    data = b"Subject: t\n\n.dot\nend"
    key = md.deliver(data)
    assert key.startswith("new/") and ":" not in key
    assert os.listdir(os.path.join(md.path, "tmp")) == []
    with md.open_message(key) as fh:
        assert fh.read() == data
    (info,) = md.scan()
    assert info.key == key
    assert info.uid == key[len("new/") :] or info.uid.startswith("~")
    assert is_valid_uid(info.uid)
    assert info.size == len(unstuff(stuff(data)))
    assert stat.S_IMODE(os.stat(os.path.join(md.path, key)).st_mode) == 0o600


def test_deliver_unique_names_across_threads(md: Maildir) -> None:
    keys: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        mine = [md.deliver(b"x\n") for _ in range(25)]
        with lock:
            keys.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 100
    assert len(md.scan()) == 100


def test_concurrent_scans_agree(md: Maildir) -> None:
    for i in range(30):
        md.deliver(b".line %d\n" % i * (i + 1))
    expected = Maildir(md.path).scan()
    results: list[list[MessageInfo]] = []

    def work() -> None:
        results.append(md.scan())

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == expected for r in results)


# -- directory handles --------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_close_releases_the_lock_and_every_directory_handle(md: Maildir) -> None:
    key = put(md, "cur/1700000000.M1P1.h:2,")
    before = open_fds()
    store = Maildir(md.path)
    store.lock()
    assert open_fds() > before
    store.close()
    assert open_fds() == before
    md.lock()  # the lock went with close()
    md.unlock()
    with pytest.raises(MailboxError):  # a closed store never touches a reused descriptor
        store.open_message(key)
    store.close()  # idempotent


def test_removed_cur_is_noticed_even_through_the_open_handle(md: Maildir) -> None:
    put(md, "cur/1700000000.M1P1.h:2,")
    os.unlink(os.path.join(md.path, "cur", "1700000000.M1P1.h:2,"))
    os.rmdir(os.path.join(md.path, "cur"))
    with pytest.raises(MailboxError):
        md.scan()


def test_symlinked_maildir_without_root_is_refused(tmp_path: Path) -> None:
    real = Maildir(tmp_path / "real", create=True)
    os.symlink(real.path, tmp_path / "link")
    with pytest.raises(MailboxError, match="symbolic link"):
        Maildir(tmp_path / "link")
    os.rename(os.path.join(real.path, "cur"), os.path.join(real.path, "cur.real"))
    os.symlink(os.path.join(real.path, "cur.real"), os.path.join(real.path, "cur"))
    with pytest.raises(MailboxError, match="symbolic link"):
        Maildir(real.path)
