"""Synchronous Maildir store behind the POP3 session.

Blocking file I/O on purpose: the Twisted layer calls every method through
``deferToThread``, so this module must not import Twisted and each instance
guards its own mutable state (lock file, size cache) with a mutex.

Policy decisions (the "why"):

* Messages are read from ``new/`` and ``cur/``; files in ``new/`` stay there.
  Nothing here deletes or renames on its own: only :meth:`Maildir.delete`,
  called by the server in the UPDATE state, removes files.
* Only regular files count. Dot-files, subdirectories, FIFOs/devices and
  *all* symlinks are ignored, and messages are opened with ``O_NOFOLLOW``, so
  a planted symlink can never make us serve a file from elsewhere (stricter
  than ignoring only symlinks that point outside; real deliveries never
  create symlinks).
* Sizes are computed by reading each file in chunks and counting octets the
  way the encoder sends them (:func:`~pop3shield.core.dotstuff.wire_size`).
  The ``,S=``/``,W=`` fields some MDAs put in names are not trusted: a wrong
  size in LIST makes clients truncate or hang. Results are cached per
  instance by key + (st_size, st_mtime_ns, st_ino), so a rescan costs one
  stat per file.
* UIDL is the Maildir unique name (the part before the first ':'), which
  survives the new/ -> cur/ move and flag changes. Names that are not valid
  UIDL text (0x21-0x7E, 1-70 chars) get ``"~" + sha256(name)[:40]``; plain
  names starting with '~' are hashed too, so the two forms can never collide.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from pop3shield.core.dotstuff import wire_size_chunks

__all__ = ["LOCK_NAME", "Maildir", "MailboxError", "MailboxInUse", "MessageInfo"]

log = logging.getLogger(__name__)

LOCK_NAME = ".pop3shield.lock"
# new/ first: a message moved new/ -> cur/ between the two listings is then
# seen twice (and de-duplicated, cur/ wins) rather than not at all.
_MESSAGE_DIRS = ("new", "cur")
_LAYOUT_DIRS = ("cur", "new", "tmp")
_READ_SIZE = 64 * 1024
_UID_MAX = 70
_HASH_PREFIX = "~"
_HASH_HEX_LEN = 40
_DELIVER_ATTEMPTS = 10
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# Process-wide so two Maildir instances delivering in the same microsecond
# still get different names (the Maildir spec's "Q" delivery counter).
_delivery_counter = itertools.count(1)


class MailboxInUse(Exception):
    """Another session holds the mailbox lock."""


class MailboxError(Exception):
    """Missing/unreadable maildir and similar; text is for operators, not clients."""


@dataclass(frozen=True)
class MessageInfo:
    """One message as seen by a POP3 session."""

    key: str  # "new/<name>" or "cur/<name>": identifies the file for open/delete
    uid: str  # stable UIDL, 0x21-0x7E, 1-70 chars
    size: int  # == dotstuff.wire_size(content): the octets RETR delivers


def _base_name(name: str) -> str:
    """Maildir unique name: everything before the first ':' (info/flags)."""
    return name.split(":", 1)[0]


def _uid_for(base: str) -> str:
    """UIDL for a unique name; hashed when it is not valid UIDL text."""
    if (
        0 < len(base) <= _UID_MAX
        and base.isascii()
        and base.isprintable()
        and " " not in base
        and not base.startswith(_HASH_PREFIX)
    ):
        return base
    raw = base.encode("utf-8", "surrogateescape")
    return _HASH_PREFIX + hashlib.sha256(raw).hexdigest()[:_HASH_HEX_LEN]


def _delivery_time(base: str, st: os.stat_result) -> int:
    """Seconds from the leading "time." of a Maildir name, else the file mtime.

    The name is preferred because it never changes; mtime is only a fallback
    for names written by non-conforming tools.
    """
    head = base.split(".", 1)[0]
    if head.isascii() and head.isdigit() and len(head) <= 12:
        return int(head)
    return int(st.st_mtime)


def _split_key(key: str) -> tuple[str, str]:
    """Validate a message key and return (subdir, name); ValueError if unsafe."""
    if not isinstance(key, str):
        raise ValueError("message key must be a str")
    sub, sep, name = key.partition("/")
    if (
        not sep
        or sub not in _MESSAGE_DIRS
        or not name
        or "/" in name
        or "\0" in name
        or name.startswith(".")
    ):
        raise ValueError(f"invalid message key {key!r}")
    return sub, name


def _safe_hostname() -> str:
    """Hostname for unique names, with '/' and ':' escaped as the Maildir spec says."""
    host = socket.gethostname() or "localhost"
    return host.replace("/", "\\057").replace(":", "\\072")


def _fsync_dir(path: str) -> None:
    """Make renames/unlinks in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Maildir:
    """A Maildir as one POP3 session sees it (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False) -> None:
        self.path = os.fsdecode(os.fspath(path))
        self._mutex = threading.RLock()
        self._lockfile: BinaryIO | None = None
        # key -> ((st_size, st_mtime_ns, st_ino), wire size)
        self._sizes: dict[str, tuple[tuple[int, int, int], int]] = {}
        if create:
            self.create_layout()
        for sub in _MESSAGE_DIRS:
            if not os.path.isdir(os.path.join(self.path, sub)):
                raise MailboxError(f"not a maildir (no {sub}/): {self.path}")

    # -- layout and locking -------------------------------------------------

    def create_layout(self) -> None:
        """Create the maildir and cur/ new/ tmp/ (mode 0700); existing dirs are left alone."""
        try:
            self._mkdir_private(self.path, parents=True)
            for sub in _LAYOUT_DIRS:
                self._mkdir_private(os.path.join(self.path, sub))
        except OSError as exc:
            raise MailboxError(f"cannot create maildir {self.path}: {exc}") from exc

    @staticmethod
    def _mkdir_private(path: str, *, parents: bool = False) -> None:
        """mkdir with mode 0700, forcing the mode in case the umask is odd."""
        try:
            if parents:
                os.makedirs(path, mode=0o700)
            else:
                os.mkdir(path, 0o700)
        except FileExistsError:
            if not os.path.isdir(path):
                raise
            return
        os.chmod(path, 0o700)

    def lock(self) -> None:
        """Take the exclusive, non-blocking session lock; MailboxInUse if held elsewhere.

        flock() locks belong to the open file description, so a second
        Maildir object (even in this process) opens its own and conflicts.
        Calling lock() again on the instance that holds it is a no-op. The
        lock file object closes (and so unlocks) if the instance is garbage
        collected, so a forgotten unlock() cannot wedge the mailbox forever.
        """
        with self._mutex:
            if self._lockfile is not None:
                return
            lockfile = self._open_lock_file()
            try:
                fcntl.flock(lockfile.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lockfile.close()
                raise MailboxInUse(f"mailbox is locked: {self.path}") from None
            except OSError as exc:
                lockfile.close()
                raise MailboxError(f"cannot lock {self.path}: {exc}") from exc
            self._lockfile = lockfile

    def _open_lock_file(self) -> BinaryIO:
        """Open/create the lock file without following symlinks."""
        path = os.path.join(self.path, LOCK_NAME)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | _O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise MailboxError(f"cannot open lock file {path}: {exc}") from exc
        lockfile = os.fdopen(fd, "r+b", buffering=0)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            lockfile.close()
            raise MailboxError(f"lock file is not a regular file: {path}")
        return lockfile  # type: ignore[return-value]

    def unlock(self) -> None:
        """Release the session lock; idempotent."""
        with self._mutex:
            lockfile, self._lockfile = self._lockfile, None
            if lockfile is not None:
                lockfile.close()  # closing the description drops the flock

    # -- reading --------------------------------------------------------------

    def scan(self) -> list[MessageInfo]:
        """List messages in new/ and cur/, ordered by delivery time then unique name.

        The order depends only on the names (or mtime for odd names), so it is
        the same in every session. A file that vanishes or cannot be read
        during the scan is skipped (and logged); a missing maildir raises
        MailboxError.
        """
        with self._mutex:
            found = self._list_messages()
            entries: list[tuple[tuple[int, str], MessageInfo]] = []
            index: dict[str, str] | None = None
            for base, (key, st) in found.items():
                size = self._cached_size(key, st)
                if size is None:
                    # Another agent may have moved it new/ -> cur/ (or re-flagged it).
                    index = self._base_index() if index is None else index
                    moved = index.get(base)
                    if moved is None or moved == key:
                        continue
                    key, size = moved, self._cached_size(moved)
                    if size is None:
                        continue
                info = MessageInfo(key=key, uid=_uid_for(base), size=size)
                entries.append(((_delivery_time(base, st), base), info))
            entries.sort(key=lambda item: item[0])
            live = {info.key for _, info in entries}
            self._sizes = {k: v for k, v in self._sizes.items() if k in live}
            return [info for _, info in entries]

    def _list_messages(self) -> dict[str, tuple[str, os.stat_result]]:
        """Regular, non-dot files of new/ and cur/ by unique name (cur/ wins)."""
        found: dict[str, tuple[str, os.stat_result]] = {}
        for sub, name, st in self._iter_files():
            found[_base_name(name)] = (f"{sub}/{name}", st)
        return found

    def _iter_files(self) -> Iterator[tuple[str, str, os.stat_result]]:
        """Yield (subdir, name, lstat) for every candidate message file."""
        for sub in _MESSAGE_DIRS:
            directory = os.path.join(self.path, sub)
            try:
                entries = list(os.scandir(directory))
            except OSError as exc:
                raise MailboxError(f"cannot list {directory}: {exc}") from exc
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # vanished between readdir and stat
                if stat.S_ISREG(st.st_mode):
                    yield sub, entry.name, st

    def _base_index(self) -> dict[str, str]:
        """Current unique name -> key map, used to follow files other agents moved."""
        return {base: key for base, (key, _) in self._list_messages().items()}

    def _cached_size(self, key: str, st: os.stat_result | None = None) -> int | None:
        """Wire size of ``key``, from cache when the file is unchanged; None if unreadable."""
        cached = self._sizes.get(key)
        if st is not None and cached and cached[0] == (st.st_size, st.st_mtime_ns, st.st_ino):
            return cached[1]
        try:
            with self._open_regular(key) as fh:
                fst = os.fstat(fh.fileno())
                size = wire_size_chunks(iter(lambda: fh.read(_READ_SIZE), b""))
        except FileNotFoundError:
            return None
        except (OSError, MailboxError) as exc:
            log.warning("skipping unreadable message %s in %s: %s", key, self.path, exc)
            return None
        self._sizes[key] = ((fst.st_size, fst.st_mtime_ns, fst.st_ino), size)
        return size

    def open_message(self, key: str) -> BinaryIO:
        """Open a message for reading (binary, buffered).

        ``key`` must be "new/<name>" or "cur/<name>" (ValueError otherwise).
        If the file was moved new/ -> cur/ or re-flagged by another agent since
        the scan, the file with the same unique name is opened instead; if it
        is gone, FileNotFoundError propagates. Symlinks and non-regular files
        are refused (OSError / MailboxError).
        """
        _, name = _split_key(key)
        try:
            return self._open_regular(key)
        except FileNotFoundError:
            moved = self._base_index().get(_base_name(name))
            if moved is None:
                raise
            return self._open_regular(moved)

    def _open_regular(self, key: str) -> BinaryIO:
        """Open a validated key without following symlinks or blocking on FIFOs."""
        _split_key(key)
        path = os.path.join(self.path, key)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise MailboxError(f"not a regular file: {path}")
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
            return os.fdopen(fd, "rb")  # type: ignore[return-value]
        except BaseException:
            os.close(fd)
            raise

    # -- writing ------------------------------------------------------------

    def delete(self, keys: Iterable[str]) -> list[str]:
        """The UPDATE step: unlink each marked message; return keys that could not be deleted.

        All keys are validated first (ValueError, nothing deleted) because a
        bad key is a server bug, not a mailbox condition. A file that is
        already gone counts as deleted; if another agent moved or re-flagged
        it, the file with the same unique name is deleted instead, since the
        user asked for that message to go. Directories are fsynced at the end
        so the deletions survive a crash.
        """
        keys = list(keys)
        for key in keys:
            _split_key(key)
        failed: list[str] = []
        touched: set[str] = set()
        index: dict[str, str] | None = None
        for key in keys:
            try:
                if self._unlink(key, touched):
                    continue
                index = self._base_index() if index is None else index
                moved = index.get(_base_name(_split_key(key)[1]))
                if moved is not None and moved != key:
                    self._unlink(moved, touched)
            except (OSError, MailboxError) as exc:
                log.warning("cannot delete %s in %s: %s", key, self.path, exc)
                failed.append(key)
        self._sync_dirs(touched)
        with self._mutex:
            for key in keys:
                self._sizes.pop(key, None)
        return failed

    def _unlink(self, key: str, touched: set[str]) -> bool:
        """Unlink one message; False if it was already gone."""
        try:
            os.unlink(os.path.join(self.path, key))
        except FileNotFoundError:
            return False
        touched.add(key.split("/", 1)[0])
        return True

    def _sync_dirs(self, subs: Iterable[str]) -> None:
        """fsync the given subdirectories; failures are logged (the unlinks already happened)."""
        for sub in sorted(subs):
            try:
                _fsync_dir(os.path.join(self.path, sub))
            except OSError as exc:
                log.warning("cannot fsync %s/%s: %s", self.path, sub, exc)

    def deliver(self, data: bytes) -> str:
        """Store a message the Maildir way (write to tmp/, fsync, link into new/); return its key."""
        for _ in range(_DELIVER_ATTEMPTS):
            name = self._unique_name()
            tmp_path = os.path.join(self.path, "tmp", name)
            new_path = os.path.join(self.path, "new", name)
            try:
                self._write_new_file(tmp_path, data)
            except FileExistsError:
                continue
            try:
                if self._publish(tmp_path, new_path):
                    _fsync_dir(os.path.join(self.path, "new"))
                    return f"new/{name}"
            except BaseException:
                self._discard(tmp_path)
                raise
        raise MailboxError(f"could not find a unique name to deliver into {self.path}")

    @staticmethod
    def _unique_name() -> str:
        """time.M<usec>P<pid>Q<n>.<host>, as the Maildir spec describes."""
        now_us = time.time_ns() // 1000
        seconds, usec = divmod(now_us, 1_000_000)
        counter = next(_delivery_counter)
        return f"{seconds}.M{usec}P{os.getpid()}Q{counter}.{_safe_hostname()}"

    @staticmethod
    def _write_new_file(path: str, data: bytes) -> None:
        """Create ``path`` exclusively and write ``data`` durably."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            Maildir._discard(path)
            raise
        os.close(fd)

    @staticmethod
    def _publish(tmp_path: str, new_path: str) -> bool:
        """Move tmp -> new without ever overwriting; False if the name is taken."""
        try:
            os.link(tmp_path, new_path)
        except FileExistsError:
            Maildir._discard(tmp_path)
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            # Filesystem without hard links: rename, after checking the name is free.
            if os.path.lexists(new_path):
                Maildir._discard(tmp_path)
                return False
            os.rename(tmp_path, new_path)
            return True
        Maildir._discard(tmp_path)
        return True

    @staticmethod
    def _discard(path: str) -> None:
        """Best-effort unlink of a temporary file."""
        try:
            os.unlink(path)
        except OSError:
            pass
